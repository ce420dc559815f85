//! containerd for the node: its own config, state, root and socket (so it
//! never meets a containerd the machine may run), the CRI plugin with runc
//! and the cgroupfs driver, CNI bridge config, started inside the node's
//! network namespace and recorded by PID.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    cri::Cri,
    error::{Error, IoContext, Result},
    netns, paths, process,
};

/// The marker that identifies our containerd in its command line.
fn marker() -> String {
    format!(
        "containerd --config {}",
        paths::containerd_config().display()
    )
}

pub fn config() -> String {
    format!(
        r#"# Written by podscope-testnode; removed by `podscope-testnode down`.
version = 2
root = "{root}/containerd"
state = "{state}"
# Snapshotters and tracing this node does not use.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

# The tasks service needs the v1 runtime loaded; keep its state ours
# (it defaults to /run/containerd/runc).
[plugins."io.containerd.runtime.v1.linux"]
  runtime_root = "{runc_root}-v1"

# The default would create /opt/containerd.
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # Our own pause image: nothing is ever pulled.
  sandbox_image = "{pause}"
  # Required here: without CAP_SYS_RESOURCE, oom_score_adj -998 fails every
  # sandbox with "can't get final child's PID from pipe: EOF" (docs/architecture.md).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # kubelet's cgroupfs driver: cgroup parents are paths like /kubepods/burstable/pod<uid>.
        SystemdCgroup = false
        # runc's state, otherwise under /run/containerd/runc.
        Root = "{runc_root}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = paths::ROOT_DIR,
        state = paths::containerd_state().display(),
        socket = paths::SOCKET,
        pause = paths::PAUSE_IMAGE,
        runc_root = paths::runc_root().display(),
        cni_conf = paths::cni_conf_dir().display(),
    )
}

/// The CNI network: a bridge inside the node's namespace, pod addresses from
/// 198.18.0.0/16, no masquerading (pods never talk past the node), IPAM
/// state in our state directory.
pub fn cni_config() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "podscope",
        "plugins": [{
            "type": "bridge",
            "bridge": paths::BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": paths::POD_SUBNET, "gateway": paths::POD_GATEWAY }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": paths::cni_ipam_dir(),
            },
        }],
    })
    .to_string()
}

/// Writes containerd's and CNI's config files (idempotent); true when
/// containerd's own config changed (a running containerd must restart to
/// read it, which its containers survive).
pub fn write_config() -> Result<bool> {
    for dir in [
        Path::new(paths::STATE_DIR).to_path_buf(),
        paths::cni_conf_dir(),
        paths::cni_ipam_dir(),
        Path::new(paths::ROOT_DIR).to_path_buf(),
    ] {
        std::fs::create_dir_all(&dir).ctx(|| format!("cannot create {}", dir.display()))?;
    }
    let changed = write_if_changed(&paths::containerd_config(), &config())?;
    // containerd rereads the CNI directory by itself.
    write_if_changed(
        &paths::cni_conf_dir().join("10-podscope.conflist"),
        &cni_config(),
    )?;
    Ok(changed)
}

fn write_if_changed(p: &Path, text: &str) -> Result<bool> {
    if std::fs::read_to_string(p).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    std::fs::write(p, text).ctx(|| format!("cannot write {}", p.display()))?;
    Ok(true)
}

/// Our containerd's PID, if it runs.
pub fn running() -> Option<i32> {
    process::recorded(&paths::containerd_pid(), &marker())
}

/// Starts containerd inside the node's namespace unless it runs, and waits
/// until CRI answers. Returns the PID and whether it was started now.
pub async fn start() -> Result<(i32, bool)> {
    if let Some(pid) = running() {
        Cri::connect(paths::SOCKET).await?;
        return Ok((pid, false));
    }
    write_config()?;
    // A socket left by a killed containerd would make clients wait on nothing.
    let _ = std::fs::remove_file(paths::SOCKET);
    let mut cmd = Command::new("containerd");
    cmd.arg("--config").arg(paths::containerd_config());
    let pid = process::spawn_daemon(
        cmd,
        &paths::containerd_log(),
        &paths::containerd_pid(),
        Some(&netns::path()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match Cri::connect(paths::SOCKET).await {
            Ok(_) => return Ok((pid, true)),
            Err(e) => {
                if !process::is_running(pid) {
                    return Err(Error::Msg(format!(
                        "containerd exited at start-up; see {}",
                        paths::containerd_log().display()
                    )));
                }
                if Instant::now() > deadline {
                    return Err(Error::Msg(format!(
                        "containerd did not answer CRI within 15 s ({e}); see {}",
                        paths::containerd_log().display()
                    )));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops our containerd (SIGTERM, by recorded PID). The shims and the
/// containers keep running, as on a node whose containerd restarts.
pub fn stop() -> Result<Option<i32>> {
    let Some(pid) = running() else {
        return Ok(None);
    };
    process::terminate(pid, Duration::from_secs(10))?;
    let _ = std::fs::remove_file(paths::containerd_pid());
    Ok(Some(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_to_our_directories() {
        let c = config();
        assert!(c.contains("restrict_oom_score_adj = true"));
        assert!(c.contains("SystemdCgroup = false"));
        assert!(c.contains(&format!("address = \"{}\"", paths::SOCKET)));
        assert!(c.contains(&format!("sandbox_image = \"{}\"", paths::PAUSE_IMAGE)));
        // Every absolute path it names is ours (or the CNI plugins' directory).
        for word in c.split('"').filter(|w| w.starts_with('/')) {
            assert!(
                word.starts_with(paths::STATE_DIR)
                    || word.starts_with(paths::ROOT_DIR)
                    || word == "/usr/lib/cni",
                "containerd config names {word}"
            );
        }
    }

    #[test]
    fn pods_get_benchmark_addresses() {
        let v: serde_json::Value = serde_json::from_str(&cni_config()).unwrap();
        let ipam = &v["plugins"][0]["ipam"];
        assert_eq!(ipam["ranges"][0][0]["subnet"], "198.18.0.0/16");
        assert_eq!(v["plugins"][0]["ipMasq"], false);
        assert!(
            ipam["dataDir"]
                .as_str()
                .unwrap()
                .starts_with(paths::STATE_DIR)
        );
    }
}
