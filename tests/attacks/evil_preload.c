// Code an attacker gets into an allowed binary through the dynamic loader
// (LD_PRELOAD, /etc/ld.so.preload): it runs before main and says so, so a
// test can tell the injection really happened.
#include <stdio.h>
#include <unistd.h>

__attribute__((constructor)) static void injected(void)
{
	dprintf(2, "INJECTED into pid %d\n", getpid());
}
