/* vm_readv PID HEXADDR: reads 64 bytes of PID's memory at HEXADDR with
 * process_vm_readv and prints RETURNED, the result and errno; then opens
 * /proc/PID/mem and /proc/PID/environ with O_PATH (which anyone may) and
 * prints OPATH and whether each open succeeded. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	char buf[64];
	struct iovec local = { buf, sizeof(buf) };
	struct iovec remote = { (void *)strtoul(argv[2], 0, 16), sizeof(buf) };
	ssize_t n = process_vm_readv((pid_t)strtol(argv[1], 0, 10), &local, 1, &remote, 1, 0);
	printf("RETURNED %zd %d\n", n, n < 0 ? errno : 0);
	const char *names[] = { "mem", "environ" };
	for (int i = 0; i < 2; i++) {
		char path[64];
		snprintf(path, sizeof(path), "/proc/%s/%s", argv[1], names[i]);
		printf("OPATH %s %d\n", names[i], open(path, O_PATH) >= 0);
	}
	return 0;
}
