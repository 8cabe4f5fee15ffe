/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers every netmemtrace BPF object uses. BPF-side only: nothing here is seen by
 * Python (that is netmemtrace.h's job).
 */
#ifndef __NETMEMTRACE_COMMON_BPF_H
#define __NETMEMTRACE_COMMON_BPF_H

/*
 * Add to one field of an object's self-statistics: a one-entry PERCPU_ARRAY whose
 * value is a struct of __u64 counters (named in BTF, so Python needs no enum).
 */
#define STAT_ADD(map, type, field, n)					\
	({								\
		__u32 _zero = 0;					\
		type *_s = bpf_map_lookup_elem(&(map), &_zero);		\
		if (_s)							\
			_s->field += (n);				\
	})

/*
 * The memory cgroup of the current task, as the kernfs id of its directory, on
 * whichever hierarchy carries the memory controller (works for cgroup v1 and v2).
 */
static __always_inline __u64 task_memcg_id(void)
{
	struct task_struct *task = (void *)bpf_get_current_task();
	int id = bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id);
	struct cgroup_subsys_state *css;

	if (id < 0 || id >= CGROUP_SUBSYS_COUNT)
		return 0;
	css = BPF_CORE_READ(task, cgroups, subsys[id]);
	if (!css)
		return 0;
	return BPF_CORE_READ(css, cgroup, kn, id);
}

/*
 * virt_to_page()'s constant on x86-64: the struct page of virtual address 0 were the
 * direct map's linear formula to hold there, vmemmap_base - (page_offset_base >> 12) *
 * sizeof(struct page), from the kernel's own variables at the addresses userspace found
 * in /proc/kallsyms (data symbols need CONFIG_KALLSYMS_ALL, which Debian's kernels have).
 * Read through addresses rather than __ksym externs: libbpf would parse /proc/kallsyms on
 * every load attempt, and the loader makes several. 0 where unknown.
 */
static __always_inline __u64 direct_map_page_base(__u64 pob_addr, __u64 vmb_addr)
{
#if defined(__TARGET_ARCH_x86)
	__u64 pob = 0, vmb = 0;

	if (!pob_addr || !vmb_addr)
		return 0;
	bpf_probe_read_kernel(&pob, sizeof(pob), (void *)pob_addr);
	bpf_probe_read_kernel(&vmb, sizeof(vmb), (void *)vmb_addr);
	if (!pob || !vmb)
		return 0;
	return vmb - (pob >> 12) * bpf_core_type_size(struct page);
#else
	return 0;
#endif
}

#endif /* __NETMEMTRACE_COMMON_BPF_H */
