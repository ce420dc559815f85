//! What a cgroup path says about the pod and container it belongs to.
//!
//! kubelet lays out cgroups in one of two ways, whatever the cgroup version:
//!
//! - cgroupfs driver: `/kubepods[/burstable|/besteffort]/pod<uid>/<container>`
//!   where `<container>` is the runtime's id (containerd, cri-dockerd) or
//!   `crio-<id>` (CRI-O);
//! - systemd driver: `/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid>.slice/<scope>`
//!   with the uid's dashes written as underscores and `<scope>` one of
//!   `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`
//!   (`crio-conmon-<id>.scope` holds CRI-O's monitor, not the container).
//!
//! Either may sit below a prefix (kind nodes: `/kubelet.slice/kubelet-kubepods.slice/…`).
//! The path alone gives the QoS class, the pod uid and the container id; the
//! names come from CRI.

use serde::Serialize;
use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// cgroupfs driver with a bare id: containerd or cri-dockerd.
    Unknown,
}

/// The pod (and container, below a pod) a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupRef {
    pub qos: Qos,
    pub pod_uid: String,
    /// None for the pod's own cgroup (and for CRI-O's conmon).
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error(
        "cgroup path {path:?} is under kubepods but has no pod<uid> component where kubelet puts it"
    )]
    NoPod { path: String },
    #[error("cgroup path {path:?} has a pod component with a malformed uid {uid:?}")]
    BadUid { path: String, uid: String },
}

/// Parses a cgroup path (relative to any cgroup root). `Ok(None)`: not a
/// Kubernetes pod's cgroup (a host process, or a QoS-level cgroup).
pub fn parse(path: &str) -> Result<Option<CgroupRef>, PathError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // The kubepods root: "kubepods", "kubepods.slice", or a prefixed slice such as "kubelet-kubepods.slice".
    let Some(root) = parts
        .iter()
        .position(|p| *p == "kubepods" || (p.ends_with("kubepods.slice")))
    else {
        return Ok(None);
    };
    let mut rest = &parts[root + 1..];
    let mut qos = Qos::Guaranteed;
    if let Some(first) = rest.first() {
        let level = first.strip_suffix(".slice").unwrap_or(first);
        let level = level.rsplit('-').next().unwrap_or(level);
        match level {
            "burstable" => {
                qos = Qos::Burstable;
                rest = &rest[1..];
            }
            "besteffort" => {
                qos = Qos::BestEffort;
                rest = &rest[1..];
            }
            _ => {}
        }
    }
    let Some(pod) = rest.first() else {
        // The kubepods or QoS-level cgroup itself.
        return Ok(None);
    };
    let uid = pod_uid(pod).ok_or_else(|| PathError::NoPod {
        path: path.to_string(),
    })?;
    if !valid_uid(&uid) {
        return Err(PathError::BadUid {
            path: path.to_string(),
            uid,
        });
    }
    let (container_id, runtime) = match rest.get(1) {
        Some(c) => container(c),
        None => (None, None),
    };
    Ok(Some(CgroupRef {
        qos,
        pod_uid: uid,
        container_id,
        runtime,
    }))
}

/// "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid_with_underscores>.slice" (systemd).
fn pod_uid(component: &str) -> Option<String> {
    if let Some(slice) = component.strip_suffix(".slice") {
        let idx = slice.rfind("-pod")?;
        return Some(slice[idx + 4..].replace('_', "-"));
    }
    component.strip_prefix("pod").map(str::to_string)
}

/// A pod uid as kubelet makes them: an RFC 4122 UUID, or for static pods a
/// 32-hex-digit hash.
fn valid_uid(uid: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = uid.split('-').collect();
    match groups.as_slice() {
        [a, b, c, d, e] => {
            [a.len(), b.len(), c.len(), d.len(), e.len()] == [8, 4, 4, 4, 12]
                && groups.iter().all(|g| hex(g))
        }
        [single] => single.len() == 32 && hex(single),
        _ => false,
    }
}

fn container(component: &str) -> (Option<String>, Option<Runtime>) {
    let id_ok = |id: &str| id.len() >= 12 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if let Some(scope) = component.strip_suffix(".scope") {
        if scope.starts_with("crio-conmon-") {
            return (None, Some(Runtime::CriO));
        }
        for (prefix, rt) in [
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("docker-", Runtime::Docker),
        ] {
            if let Some(id) = scope.strip_prefix(prefix).filter(|id| id_ok(id)) {
                return (Some(id.to_string()), Some(rt));
            }
        }
        return (None, None);
    }
    if let Some(id) = component.strip_prefix("crio-").filter(|id| id_ok(id)) {
        return (Some(id.to_string()), Some(Runtime::CriO));
    }
    if id_ok(component) {
        return (Some(component.to_string()), Some(Runtime::Unknown));
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c6e0f2a9d8b7c6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d";
    const UID: &str = "0f5e3c1a-7b2d-4e8f-9a6c-1d2e3f4a5b6c";
    const UID_SYSTEMD: &str = "0f5e3c1a_7b2d_4e8f_9a6c_1d2e3f4a5b6c";

    fn r(qos: Qos, container: Option<&str>, runtime: Option<Runtime>) -> Option<CgroupRef> {
        Some(CgroupRef {
            qos,
            pod_uid: UID.to_string(),
            container_id: container.map(str::to_string),
            runtime,
        })
    }

    // Recorded from nodes (ids and uids replaced by the constants above).
    #[test]
    fn cgroupfs_driver_with_containerd() {
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}/{ID}")).unwrap(),
            r(Qos::Burstable, Some(ID), Some(Runtime::Unknown))
        );
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod{UID}/{ID}")).unwrap(),
            r(Qos::BestEffort, Some(ID), Some(Runtime::Unknown))
        );
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/{ID}")).unwrap(),
            r(Qos::Guaranteed, Some(ID), Some(Runtime::Unknown))
        );
        // The pod's own cgroup.
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}")).unwrap(),
            r(Qos::Burstable, None, None)
        );
    }

    #[test]
    fn systemd_driver_with_each_runtime() {
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope")).unwrap(),
            r(Qos::Burstable, Some(ID), Some(Runtime::Containerd))
        );
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/crio-{ID}.scope")).unwrap(),
            r(Qos::BestEffort, Some(ID), Some(Runtime::CriO))
        );
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/docker-{ID}.scope"
            ))
            .unwrap(),
            r(Qos::Guaranteed, Some(ID), Some(Runtime::Docker))
        );
        // CRI-O's conmon lives beside the container, in the pod.
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/crio-conmon-{ID}.scope")).unwrap(),
            r(Qos::Burstable, None, Some(Runtime::CriO))
        );
    }

    #[test]
    fn cri_o_with_cgroupfs_and_nested_prefixes() {
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}/crio-{ID}")).unwrap(),
            r(Qos::Burstable, Some(ID), Some(Runtime::CriO))
        );
        // kind: the node's kubelet runs under its own slice.
        assert_eq!(
            parse(&format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope")).unwrap(),
            r(Qos::BestEffort, Some(ID), Some(Runtime::Containerd))
        );
        // Sub-cgroups a container makes for itself belong to that container.
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/{ID}/init.scope")).unwrap(),
            r(Qos::Guaranteed, Some(ID), Some(Runtime::Unknown))
        );
    }

    #[test]
    fn static_pods_have_hash_uids() {
        let hash = "6e5b9c0d1f2a3b4c5d6e7f8091a2b3c4";
        let got = parse(&format!("/kubepods/burstable/pod{hash}/{ID}"))
            .unwrap()
            .unwrap();
        assert_eq!(got.pod_uid, hash);
    }

    #[test]
    fn host_and_qos_level_paths_are_not_pods() {
        for p in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods",
            "/kubepods/burstable",
            "/kubepods.slice/kubepods-besteffort.slice",
            "",
        ] {
            assert_eq!(parse(p).unwrap(), None, "{p}");
        }
    }

    #[test]
    fn malformed_kubepods_paths_are_errors_not_panics() {
        assert!(matches!(
            parse("/kubepods/burstable/notapod/x"),
            Err(PathError::NoPod { .. })
        ));
        assert!(matches!(
            parse("/kubepods/burstable/podnot-a-uid/x"),
            Err(PathError::BadUid { .. })
        ));
        assert!(matches!(
            parse("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podzz.slice"),
            Err(PathError::BadUid { .. })
        ));
        // A component that is not a container id is ignored, not misread.
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/../x")).unwrap(),
            r(Qos::Guaranteed, None, None)
        );
    }
}
