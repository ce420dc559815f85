//! podscope's probes on the real kernel: the scenarios of `podscope::selftest`
//! (the same code the static `podscope-kernel-tests` runs in the VM matrix),
//! one cargo test each. Needs root.

mod support;

use std::path::PathBuf;

use podscope::selftest::{self, Context, Outcome};
use support::privileged;

fn scenario(name: &str) {
    if !privileged(name) {
        return;
    }
    let s = selftest::find(name).unwrap_or_else(|| panic!("no scenario {name}"));
    let ctx = Context {
        helper: PathBuf::from(env!("CARGO_BIN_EXE_podscope-kernel-tests")),
        expect: vec![],
    };
    match selftest::run(s, &ctx) {
        Outcome::Pass(detail) => eprintln!("{name}: {detail}"),
        Outcome::Fail(e) => panic!("{name}: {e}"),
        Outcome::Skip(why) => {
            assert!(!support::required(), "{name} skipped: {why}");
            support::say_skipped(name, &why);
        }
    }
}

#[test]
fn the_best_exit_hook_is_chosen_by_probing() {
    scenario("exits_hook_selection");
}

#[test]
fn doctor_reports_the_hook_exits_chose() {
    scenario("doctor_reports_the_choice");
}

#[test]
fn exit_code_3_is_reported() {
    scenario("exit_code_3");
}

#[test]
fn sigkill_is_reported() {
    scenario("sigkill");
}

#[test]
fn default_sigterm_is_reported() {
    scenario("default_sigterm");
}

#[test]
fn a_segfault_is_reported_with_the_core_flag_the_kernel_decided() {
    scenario("sigsegv_core_flag");
}

#[test]
fn a_thread_ending_in_a_live_process_is_a_thread_exit() {
    scenario("lone_thread_exit");
}

#[test]
fn a_multithreaded_process_exiting_gives_one_process_event() {
    scenario("multithreaded_process_exit");
}

#[test]
fn the_plain_tracepoint_fallback_works_too() {
    scenario("plain_tracepoint_fallback");
}

#[test]
fn the_tp_btf_fallback_works_too() {
    scenario("tp_btf_fallback");
}

#[test]
fn ten_thousand_short_processes_are_all_accounted_for() {
    scenario("ten_thousand_processes");
}

#[test]
fn cgroup_creation_and_removal_are_reported() {
    scenario("cgroup_mkdir_rmdir");
}

#[test]
fn a_new_cgroups_first_exec_names_the_containers_main_process() {
    scenario("cgroup_first_exec");
}

#[test]
fn a_signal_names_its_sender_and_target() {
    scenario("signal_sender_and_target");
}

#[test]
fn a_real_fault_is_told_from_a_kill() {
    scenario("signal_fault_origin");
}

#[test]
fn an_oom_kill_names_its_victim_and_the_limit_it_hit() {
    scenario("oom_victim_and_scope");
}

#[test]
fn packet_drops_and_netfilter_links_are_reported() {
    scenario("net_paths");
}

#[test]
fn every_scenario_has_a_cargo_test() {
    let me = include_str!("kernel.rs");
    for s in selftest::SCENARIOS {
        assert!(
            me.contains(&format!("scenario(\"{}\")", s.name)),
            "{} has no #[test] here",
            s.name
        );
    }
}

#[test]
fn a_throttled_cgroup_is_measured_as_cpu_stat_counts_it() {
    scenario("throttle_matches_cpu_stat");
}
