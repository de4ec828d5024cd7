/* process_vm_readv through the 32-bit entry (int $0x80, IA32 emulation):
 * compat_readv PID HEXADDR reads 64 bytes of PID's memory at HEXADDR with
 * the i386 system call 347, whose numbers and registers differ from
 * x86-64's. Prints RETURNED and the result if it lives. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

int main(int argc, char **argv)
{
	if (argc != 3)
		return 2;
	long pid = strtol(argv[1], 0, 10);
	unsigned long addr = strtoul(argv[2], 0, 16);
	/* Compat iovecs hold 32-bit pointers: everything below 4 GiB. */
	uint32_t *area = mmap(0, 4096, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
	if (area == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	area[0] = (uint32_t)(uintptr_t)(area + 64); /* local: base, len */
	area[1] = 64;
	area[2] = (uint32_t)addr; /* remote */
	area[3] = 64;
	printf("CALLING\n");
	fflush(stdout);
	long r;
	__asm__ volatile("int $0x80"
			 : "=a"(r)
			 : "a"(347L), "b"(pid), "c"((long)(uintptr_t)area), "d"(1L),
			   "S"((long)(uintptr_t)(area + 2)), "D"(1L)
			 : "memory");
	printf("RETURNED %ld\n", r);
	return 0;
}
