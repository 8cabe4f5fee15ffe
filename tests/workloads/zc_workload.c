// SPDX-License-Identifier: GPL-2.0
/*
 * Zerocopy workload for netmemtrace tests: a MSG_ZEROCOPY sender thread and a
 * TCP_ZEROCOPY_RECEIVE reader over 127.0.0.1 in the same process, counting everything
 * itself so tests compare the tool against these totals (the independent ground truth).
 *
 *   zc_workload BYTES MODE [errors]
 *     MODE hold:    every call maps at a fresh address of one big window, all kept mapped
 *     MODE reuse:   every call maps at the start of a small window (the kernel zaps first;
 *                   it may zap more than it maps, so held_bytes is exact in hold mode only)
 *     MODE discard: map, touch, madvise(MADV_DONTNEED) what was mapped, repeat
 *     MODE tcpmmap: as the kernel's tcp_mmap selftest reads: map (no copybuf),
 *                   madvise(MADV_DONTNEED) the chunk, then read() the recv_skip_hint
 *                   remainder after every call; the
 *                   sender writes chunks that are not whole pages, so there is a remainder.
 *                   Prints "mmap_pct" the way tcp_mmap prints "%g %% mmap'ed".
 *     MODE spin:    call TCP_ZEROCOPY_RECEIVE forever on an idle socket (to be killed)
 *     errors:       first make two calls TCP refuses (an address not page-aligned, a
 *                   listening socket)
 *
 * After the transfer it prints one JSON line of totals, then obeys stdin commands, each
 * answered with a JSON line: "mremap" (move the window elsewhere), "dontneed_half",
 * "munmap", "exit".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <linux/tcp.h>	/* the full struct tcp_zerocopy_receive (glibc's is old) */
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif

#define CHUNK (64 * 1024)
#define MSS 28672	/* 7 pages; TCP_MAXSEG allows at most 32767 */
#define COPYBUF (16 * 1024)
#define ODD_CHUNK 50000	/* tcpmmap mode: not a whole number of pages */

static long page;
static size_t total_bytes;
static size_t send_chunk = CHUNK;

struct tx_totals {
	unsigned long calls, bytes, notifications, completed, copied;
};

static struct tx_totals tx;

static void die(const char *what)
{
	fprintf(stderr, "zc_workload: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Reads every queued zerocopy notification; returns how many send ids they completed. */
static unsigned long drain_errqueue(int fd, int wait)
{
	unsigned long done = 0;
	char control[128];
	struct msghdr msg = { 0 };
	struct cmsghdr *cm;
	struct sock_extended_err *ee;

	for (;;) {
		if (wait) {
			struct pollfd pfd = { .fd = fd, .events = 0 };

			if (poll(&pfd, 1, 2000) <= 0)
				return done;
		}
		msg.msg_control = control;
		msg.msg_controllen = sizeof(control);
		if (recvmsg(fd, &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) {
			if (errno == EAGAIN)
				return done;
			die("recvmsg(MSG_ERRQUEUE)");
		}
		for (cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
			ee = (struct sock_extended_err *)CMSG_DATA(cm);
			if (ee->ee_origin != SO_EE_ORIGIN_ZEROCOPY)
				continue;
			tx.notifications++;
			tx.completed += ee->ee_data - ee->ee_info + 1;
			done += ee->ee_data - ee->ee_info + 1;
			if (ee->ee_code & SO_EE_CODE_ZEROCOPY_COPIED)
				tx.copied += ee->ee_data - ee->ee_info + 1;
		}
		if (wait)
			return done;
	}
}

static void *sender(void *arg)
{
	int fd = *(int *)arg, one = 1;
	static char buf[CHUNK];
	size_t left = total_bytes;

	memset(buf, 'z', sizeof(buf));
	if (setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof(one)))
		die("SO_ZEROCOPY");
	while (left) {
		size_t n = left < send_chunk ? left : send_chunk;
		ssize_t sent = send(fd, buf, n, MSG_ZEROCOPY);

		if (sent < 0) {
			if (errno == ENOBUFS) {	/* too many notifications pending */
				drain_errqueue(fd, 1);
				continue;
			}
			die("send(MSG_ZEROCOPY)");
		}
		tx.calls++;
		tx.bytes += sent;
		left -= sent;
		drain_errqueue(fd, 0);
	}
	while (tx.completed < tx.calls)
		if (!drain_errqueue(fd, 1))
			break;
	shutdown(fd, SHUT_WR);
	return NULL;
}

struct rx_totals {
	unsigned long calls, errors, mapped, copied, skip_hint, recv_bytes;
};

static struct rx_totals rx;
static char *window;
static size_t window_len;
static unsigned char *held;		/* one byte per page of the window: mapped now */

static size_t held_bytes(void)
{
	size_t n = 0;

	for (size_t i = 0; i < window_len / page; i++)
		n += held[i];
	return n * page;
}

static int zc_call(int fd, struct tcp_zerocopy_receive *zc, char *addr, size_t len, char *copybuf)
{
	socklen_t zl = sizeof(*zc);

	memset(zc, 0, sizeof(*zc));
	zc->address = (uintptr_t)addr;
	zc->length = len;
	zc->copybuf_address = (uintptr_t)copybuf;
	zc->copybuf_len = copybuf ? COPYBUF : 0;
	rx.calls++;
	if (getsockopt(fd, IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE, zc, &zl)) {
		rx.errors++;
		return -1;
	}
	return 0;
}

static void receive(int fd, const char *mode)
{
	static char copybuf[COPYBUF], plain[CHUNK];
	struct tcp_zerocopy_receive zc;
	int hold = !strcmp(mode, "hold"), tcpmmap = !strcmp(mode, "tcpmmap");
	int discard = !strcmp(mode, "discard") || tcpmmap;
	size_t off = 0, got = 0;
	volatile char sink;

	while (got < total_bytes) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		size_t len = window_len - off;

		if (poll(&pfd, 1, 5000) <= 0)
			die("poll: receiver stalled");
		if (!hold)
			off = 0, len = window_len;
		/* tcp_mmap passes no copybuf: what cannot be mapped is left to read() */
		if (zc_call(fd, &zc, window + off, len, tcpmmap ? NULL : copybuf))
			die("TCP_ZEROCOPY_RECEIVE");
		if (zc.length) {
			/* The kernel zapped then mapped [off, off+length). */
			memset(held + off / page, 1, zc.length / page);
			sink = window[off];
			if (discard) {
				if (madvise(window + off, zc.length, MADV_DONTNEED))
					die("madvise");
				memset(held + off / page, 0, zc.length / page);
			}
			if (hold)
				off += zc.length;
		}
		(void)sink;
		rx.mapped += zc.length;
		rx.copied += zc.copybuf_len > 0 ? zc.copybuf_len : 0;
		rx.skip_hint += zc.recv_skip_hint;
		got += zc.length + (zc.copybuf_len > 0 ? zc.copybuf_len : 0);
		if (tcpmmap && zc.recv_skip_hint) {
			/* tcp_mmap: read(fd, buffer, zc.recv_skip_hint) after every call */
			size_t want = zc.recv_skip_hint < CHUNK ? zc.recv_skip_hint : CHUNK;
			ssize_t n = read(fd, plain, want);

			if (n <= 0)
				die("read");
			rx.recv_bytes += n;
			got += n;
		} else if (!zc.length && zc.copybuf_len <= 0 && zc.recv_skip_hint) {
			size_t want = zc.recv_skip_hint < CHUNK ? zc.recv_skip_hint : CHUNK;
			ssize_t n = recv(fd, plain, want, 0);

			if (n <= 0)
				die("recv");
			rx.recv_bytes += n;
			got += n;
		}
		if (hold && window_len - off < (size_t)page)
			break;
	}
}

static void spin(int fd)
{
	static char copybuf[COPYBUF];
	struct tcp_zerocopy_receive zc;

	printf("{\"event\": \"spinning\", \"pid\": %d}\n", getpid());
	fflush(stdout);
	for (;;)
		zc_call(fd, &zc, window, window_len, copybuf);
}

/* Two calls TCP_ZEROCOPY_RECEIVE refuses in TCP itself (so every hook family sees them). */
static void bad_calls(int sock, int listener)
{
	static char copybuf[COPYBUF];
	struct tcp_zerocopy_receive zc;

	if (!zc_call(sock, &zc, window + 1, window_len - page, copybuf) || errno != EINVAL)
		die("unaligned TCP_ZEROCOPY_RECEIVE did not fail with EINVAL");
	if (!zc_call(listener, &zc, window, window_len, copybuf) || errno != ENOTCONN)
		die("TCP_ZEROCOPY_RECEIVE on a listener did not fail with ENOTCONN");
}

static void report(const char *event)
{
	printf("{\"event\": \"%s\", \"pid\": %d, \"window\": %lu, \"window_len\": %zu, "
	       "\"tx_zc_calls\": %lu, \"tx_zc_bytes\": %lu, \"tx_notifications\": %lu, "
	       "\"tx_completed_sends\": %lu, \"tx_copied_sends\": %lu, \"rx_calls\": %lu, "
	       "\"rx_errors\": %lu, \"rx_mapped_bytes\": %lu, \"rx_copied_bytes\": %lu, "
	       "\"rx_skip_hint_bytes\": %lu, \"rx_recv_bytes\": %lu, \"held_bytes\": %zu, "
	       "\"mmap_pct\": \"%g\"}\n",
	       event, getpid(), (unsigned long)(uintptr_t)window, window_len, tx.calls, tx.bytes,
	       tx.notifications, tx.completed, tx.copied, rx.calls, rx.errors, rx.mapped,
	       rx.copied, rx.skip_hint, rx.recv_bytes, held ? held_bytes() : 0,
	       /* tcp_mmap: "%g %% mmap'ed", mapped over everything received */
	       rx.mapped + rx.copied + rx.recv_bytes ?
	       rx.mapped * 100.0 / (rx.mapped + rx.copied + rx.recv_bytes) : 0.0);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	socklen_t alen = sizeof(addr);
	int lfd, cfd, sfd, mss = MSS, one = 1;
	const char *mode;
	pthread_t thr;
	char cmd[64];

	if (argc < 3)
		return fprintf(stderr, "usage: %s BYTES hold|reuse|discard|tcpmmap|spin [errors]\n",
			       argv[0]), 2;
	page = sysconf(_SC_PAGESIZE);
	total_bytes = strtoul(argv[1], NULL, 0);
	mode = argv[2];
	if (!strcmp(mode, "tcpmmap"))
		send_chunk = ODD_CHUNK;
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    setsockopt(lfd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) ||
	    bind(lfd, (void *)&addr, sizeof(addr)) || listen(lfd, 1) ||
	    getsockname(lfd, (void *)&addr, &alen))
		die("listen");
	cfd = socket(AF_INET, SOCK_STREAM, 0);
	/* Page-sized segments so received payload lands page-aligned and can be mapped. */
	if (cfd < 0 || setsockopt(cfd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) ||
	    connect(cfd, (void *)&addr, sizeof(addr)))
		die("connect");
	sfd = accept(lfd, NULL, NULL);
	if (sfd < 0)
		die("accept");
	window_len = !strcmp(mode, "hold") ? (total_bytes + 2 * CHUNK + page - 1) / page * page
					    : 16 * (size_t)page;
	window = mmap(NULL, window_len, PROT_READ, MAP_SHARED, sfd, 0);
	if (window == MAP_FAILED)
		die("mmap of the socket");
	held = calloc(window_len / page, 1);
	if (argc > 3 && !strcmp(argv[3], "errors"))
		bad_calls(sfd, lfd);
	if (!strcmp(mode, "spin"))
		spin(sfd);
	if (pthread_create(&thr, NULL, sender, &cfd))
		die("pthread_create");
	receive(sfd, mode);
	pthread_join(thr, NULL);
	report("done");
	while (fgets(cmd, sizeof(cmd), stdin)) {
		if (!strncmp(cmd, "mremap", 6)) {
			/* Moved whole to a fresh address: the mapped pages go with it. */
			char *to = mmap(NULL, window_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

			if (to == MAP_FAILED)
				die("mmap");
			window = mremap(window, window_len, window_len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (window == MAP_FAILED)
				die("mremap");
		} else if (!strncmp(cmd, "dontneed_half", 13)) {
			size_t half = window_len / page / 2 * page;

			if (madvise(window, half, MADV_DONTNEED))
				die("madvise");
			memset(held, 0, half / page);
		} else if (!strncmp(cmd, "munmap", 6)) {
			if (munmap(window, window_len))
				die("munmap");
			memset(held, 0, window_len / page);
		} else if (!strncmp(cmd, "exit", 4)) {
			break;
		}
		cmd[strcspn(cmd, "\n")] = 0;
		report(cmd);
	}
	return 0;
}
