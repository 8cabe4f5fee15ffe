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

#endif /* __NETMEMTRACE_COMMON_BPF_H */
