//! BTF blobs (the kernel's, or a file given with --btf): parsing and every
//! question the agent asks never panic, recurse without bound or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use podscope::kernel::btf::Btf;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data.to_vec()) else {
        return;
    };
    for (s, m) in [
        ("task_struct", "exit_code"),
        ("task_struct", "comm"),
        ("task", "tgid"),
        ("s", "a"),
        ("cfs_rq", "throttled"),
    ] {
        if let Ok(member) = btf.member(s, m) {
            let _ = member.u32_mask();
        }
    }
    let _ = btf.enum_values("skb_drop_reason");
    let _ = btf.enum_value("reason", "A");
    let _ = btf.has_func("do_exit");
    let _ = btf.skipped();
});
