//! Every ring-buffer event decoder over arbitrary bytes, exactly as the
//! drain hands them over (`probes::raw_event`): the first byte picks the
//! family, the rest is the record.
#![no_main]

use std::collections::HashMap;

use agent_common::{
    cgroups::CgroupEvent, exits::ExitEvent, net::ConnEvent, net::DropEvent, oom::OomEvent,
    signals::SignalEvent, throttle::ThrottleEvent,
};
use libfuzzer_sys::fuzz_target;
use podscope::{
    kernel::clock::BootClock,
    probes::{
        cgroups::CgroupChange,
        exits::{Exit, decode_wait_status},
        net::{Tuple, decode_conn, decode_drop},
        oom::OomKill,
        raw_event,
        signals::Signal,
        throttle::Throttle,
    },
};

fuzz_target!(|data: &[u8]| {
    let Some((&family, rec)) = data.split_first() else {
        return;
    };
    let clock = BootClock::new();
    match family % 8 {
        0 => {
            if let Some(r) = raw_event::<ExitEvent>(rec) {
                let e = Exit::decode(&r, &clock);
                let _ = e.lifetime();
                let _ = format!("{e:?}");
            }
        }
        1 => {
            if let Some(r) = raw_event::<SignalEvent>(rec) {
                let _ = format!("{:?}", Signal::decode(&r, &clock));
            }
        }
        2 => {
            if let Some(r) = raw_event::<OomEvent>(rec) {
                let _ = format!("{:?}", OomKill::decode(&r, &clock));
            }
        }
        3 => {
            if let Some(r) = raw_event::<CgroupEvent>(rec) {
                let c = CgroupChange::decode(&r);
                let _ = podscope::metadata::cgroup_path::parse(&c.path);
            }
        }
        4 => {
            if let Some(r) = raw_event::<ThrottleEvent>(rec) {
                let _ = Throttle::decode(&r, &clock).duration();
            }
        }
        5 => {
            if let Some(r) = raw_event::<ConnEvent>(rec) {
                let _ = decode_conn(&r, &clock);
            }
        }
        6 => {
            if let Some(r) = raw_event::<DropEvent>(rec) {
                let reasons = HashMap::from([(2, "NO_SOCKET".to_string())]);
                let _ = decode_drop(&r, &reasons, &clock);
            }
        }
        _ => {
            if rec.len() >= 4 {
                let _ = decode_wait_status(u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]));
            }
            let l4 = rec.get(..4).and_then(|b| <&[u8; 4]>::try_from(b).ok());
            let _ = Tuple::from_headers(rec, l4);
        }
    }
});
