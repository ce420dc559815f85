//! Attribution cost per event: `Resolver::identify` over the cgroups of the
//! running node's pods (and host cgroups), after the resolver has learned
//! them, as the agent does for every event. Run by `cargo xtask bench pods`
//! with the test node up; prints one `key=value` line per figure. Then
//! what the CRI task pays per container exit for the runtime's report of
//! the end (one ContainerStatus), beside one listing (ListContainers).

use std::{hint::black_box, os::unix::fs::MetadataExt, path::PathBuf, time::Instant};

use podscope::{
    kernel::cgroups::CgroupLayout,
    metadata::{Resolver, ResolverOptions},
};

fn cgroup_ids(root: &std::path::Path) -> (Vec<u64>, Vec<u64>) {
    let (mut pods, mut host) = (vec![], vec![]);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                let path = e.path();
                let in_pods = path.to_string_lossy().contains("kubepods");
                if in_pods {
                    pods.push(m.ino())
                } else {
                    host.push(m.ino())
                }
                stack.push(path);
            }
        }
    }
    (pods, host)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    while let Some(a) = args.next() {
        if a == "--cri-socket" {
            socket = args.next().map(PathBuf::from);
        }
    }
    let Some(root) = CgroupLayout::current().v2_root().cloned() else {
        eprintln!("attribution bench: no cgroup v2 tree on this machine");
        std::process::exit(1);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t = Instant::now();
        let opts = ResolverOptions { cri_socket: socket, ..Default::default() };
        let mut r = Resolver::new(&opts);
        if let Some(names) = podscope::deps::cri::list_once(&opts).await {
            r.set_names(names);
        }
        let startup = t.elapsed();
        let (pods, host) = cgroup_ids(&root);
        // One host event for every three pod events: roughly a node's mix.
        let mut ids: Vec<u64> = pods.clone();
        ids.extend(host.iter().take(pods.len() / 3 + 1));
        // The root cgroup: host processes outside any service's cgroup.
        ids.push(std::fs::metadata(&root).map(|m| m.ino()).unwrap_or(1));
        let mut named = 0usize;
        for id in &ids {
            named += r.identify(*id).container.is_some() as usize;
        }
        let n = 1_000_000usize;
        let t = Instant::now();
        for i in 0..n {
            black_box(r.identify(ids[i % ids.len()]));
        }
        let per = t.elapsed().as_nanos() as f64 / n as f64;
        let (cgroups, containers) = r.tracked();
        println!("pod_cgroups={} host_cgroups={} named_containers={named} tracked_cgroups={cgroups} tracked_containers={containers}", pods.len(), host.len());
        println!("resolver_startup_ms={:.1}", startup.as_secs_f64() * 1000.0);
        println!("identify_ns_per_event={per:.0}");
        if let Some(socket) = opts.socket() {
            runtime_report_cost(&socket).await;
        }
    });
}

/// The runtime's report of a container's end is one ContainerStatus per
/// exited container, asked by the CRI task: timed over the node's
/// containers (the call costs the same for a running one), beside the
/// listing the task makes on every change anyway.
async fn runtime_report_cost(socket: &std::path::Path) {
    let Ok(mut cri) = podscope::metadata::cri::Cri::connect(socket).await else {
        eprintln!(
            "attribution bench: CRI at {} does not answer",
            socket.display()
        );
        return;
    };
    let mut lists = vec![];
    let mut ids = vec![];
    for _ in 0..20 {
        let t = Instant::now();
        ids = cri.containers().await.unwrap_or_default();
        lists.push(t.elapsed());
    }
    let mut status = vec![];
    for c in ids.iter().cycle().take(ids.len().clamp(1, 300) * 3) {
        let t = Instant::now();
        black_box(cri.container_end(&c.id).await.ok());
        status.push(t.elapsed());
    }
    if ids.is_empty() {
        return;
    }
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e6
    };
    let (s, l) = (median(&mut status), median(&mut lists));
    println!(
        "container_status_us={s:.0} list_containers_us={l:.0} containers={} status_per_listing={:.3}",
        ids.len(),
        s / l
    );
}
