// SPDX-License-Identifier: GPL-2.0
/*
 * Wall time of one syscall, in ns: the best of five loops of N calls, on fd -1 (EBADF: no
 * socket work). "getppid": a syscall netmemtrace does not watch. "sendto": one it watches
 * and lets go at once (no MSG_ZEROCOPY), as every ordinary send. "getsockopt":
 * TCP_ZEROCOPY_RECEIVE, a call it follows from entry to exit. Part 4 of the benchmark
 * (bench/syscall_cost.py) runs this with and without the tool: the difference is what each
 * such syscall pays, including what bpf_stats cannot see (the kernel's syscall tracing slow
 * path, the per-syscall event records).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

#define TCP_ZEROCOPY_RECEIVE 35

int main(int argc, char **argv)
{
	const char *call = argc > 1 ? argv[1] : "getppid";
	long n = argc > 2 ? atol(argv[2]) : 1000000, i;
	struct timespec a, b;
	double best = 1e18;
	char buf[64];
	int r;

	for (r = 0; r < 5; r++) {
		clock_gettime(CLOCK_MONOTONIC, &a);
		for (i = 0; i < n; i++) {
			socklen_t len = sizeof(buf);

			if (call[0] == 'g' && call[3] == 's')
				syscall(SYS_getsockopt, -1, 6, TCP_ZEROCOPY_RECEIVE, buf, &len);
			else if (call[0] == 's')
				syscall(SYS_sendto, -1, buf, sizeof(buf), 0, NULL, 0);
			else
				syscall(SYS_getppid);
		}
		clock_gettime(CLOCK_MONOTONIC, &b);
		double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n;
		if (ns < best)
			best = ns;
	}
	printf("%.1f\n", best);
	return 0;
}
