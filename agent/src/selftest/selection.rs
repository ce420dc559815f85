//! Capability-driven hook selection, checked on the running kernel: the
//! exits family must attach the best hook that capability probing found
//! usable, and on kernels whose capabilities are known (the VM matrix) each
//! hook type must be exactly as available as expected.

use super::{Context, Verdict, ensure, ensure_eq, fail};
use crate::probes::{
    AttachType, KernelOffsets,
    capabilities::{self, Hook},
    exits,
};

/// The capability-probe hook that corresponds to an exit attach type.
fn hook_of(kind: AttachType) -> Option<Hook> {
    match kind {
        AttachType::TpBtf => Some(Hook::TpBtf),
        AttachType::RawTp => Some(Hook::RawTp),
        AttachType::Tracepoint => Some(Hook::Tracepoint),
        _ => None,
    }
}

pub fn exits_hook_selection(ctx: &Context) -> Verdict {
    let offsets = KernelOffsets::from_sys_fs()?;
    let hooks = capabilities::probe_hooks()?;
    let chosen = exits::probe_selection(&offsets)?;
    let usable = |h: Hook| hooks.iter().any(|p| p.hook == h && p.result.is_ok());

    // The choice is the first of the family's preference list that probing
    // found usable, and every better one was tried and refused.
    let best = exits::PREFERENCE
        .into_iter()
        .find(|k| hook_of(*k).is_some_and(usable));
    if let Some(best) = best {
        ensure_eq!(
            chosen.attach_type,
            best,
            "exits hook (the best one capability probing found)"
        );
    }
    let better: Vec<AttachType> = exits::PREFERENCE
        .into_iter()
        .take_while(|k| *k != chosen.attach_type)
        .collect();
    let refused: Vec<AttachType> = chosen.refused.iter().map(|(k, _)| *k).collect();
    ensure_eq!(refused, better, "hooks refused before the chosen one");

    for (name, want) in &ctx.expect {
        if name == exits::FAMILY {
            ensure_eq!(chosen.attach_type.to_string(), *want, "exits hook");
            continue;
        }
        let Some(hook) = Hook::from_name(name) else {
            fail!(
                "unknown expectation `{name}`: use exits or one of the hook names of `podscope doctor`"
            )
        };
        let got = if usable(hook) { "ok" } else { "refused" };
        ensure!(
            want == "ok" || want == "refused",
            "expectation {name}={want}: the value must be ok or refused"
        );
        if got != want {
            let why = hooks
                .iter()
                .find(|p| p.hook == hook)
                .and_then(|p| p.result.clone().err())
                .unwrap_or_default();
            fail!("{name}: got {got}, want {want} ({why})");
        }
    }

    let summary: Vec<String> = hooks
        .iter()
        .map(|p| {
            format!(
                "{}={}",
                p.hook,
                if p.result.is_ok() { "ok" } else { "refused" }
            )
        })
        .collect();
    Ok(format!(
        "exits={} ({})",
        chosen.attach_type,
        summary.join(" ")
    ))
}

/// `podscope doctor` on this kernel: it must report the hook the exits
/// family really attaches, and a status for every hook type.
pub fn doctor_reports_the_choice(_: &Context) -> Verdict {
    use crate::cli::doctor::{Status, diagnose};
    let offsets = KernelOffsets::from_sys_fs()?;
    let chosen = exits::probe_selection(&offsets)?.attach_type;
    let report = diagnose();
    let find = |name: &str| report.checks.iter().find(|c| c.name == name);
    let Some(exits_line) = find(exits::FAMILY) else {
        fail!("doctor has no exits line")
    };
    ensure_eq!(exits_line.status, Status::Ok, "doctor's exits status");
    ensure!(
        exits_line.detail.starts_with(&format!("{chosen} ")),
        "doctor says `{}`, but the exits family chose {chosen}",
        exits_line.detail
    );
    for hook in Hook::ALL {
        let Some(c) = find(hook.name()) else {
            fail!("doctor has no {hook} line")
        };
        ensure!(
            matches!(c.status, Status::Ok | Status::Fallback),
            "doctor's {hook}: {:?} {}",
            c.status,
            c.detail
        );
    }
    Ok(format!("exits: {}", exits_line.detail))
}
