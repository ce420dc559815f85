//! The node's images, built locally (no registry is reachable): one layer
//! with Debian's static busybox (every applet as a symlink) and the static
//! `podscope-helper`, written as an OCI layout tar and imported into
//! containerd's `k8s.io` namespace with `ctr`. Two image names share the
//! layer: the workload image and the sandbox ("pause") image.
//!
//! The tar is deterministic (fixed mtimes and owners), so the image id only
//! changes when busybox or the helper does, and `up` skips the import when
//! containerd already has these exact ids.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    cri::Cri,
    error::{Error, IoContext, Result, run},
    paths,
};

pub const BUSYBOX: &str = "/bin/busybox";
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Set to a built static helper to skip building it with cargo.
pub const HELPER_ENV: &str = "PODSCOPE_HELPER";

const PATH_ENV: &str = "PATH=/bin:/usr/bin:/sbin:/usr/sbin";

/// What `build` produced: the archive and each image's id (`sha256:<config>`).
#[derive(Debug, Clone)]
pub struct Built {
    pub archive: PathBuf,
    pub image_id: String,
    pub pause_id: String,
}

/// The workspace this binary was built from (to build the helper).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The static helper: `$PODSCOPE_HELPER`, or built for musl with cargo into
/// its own target directory (a `cargo test` that runs `up` holds the lock on
/// the workspace's).
pub fn helper_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(HELPER_ENV) {
        return Ok(PathBuf::from(p));
    }
    let installed = run(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    let root = workspace_root();
    let target_dir = root.join("target/testnode-helper");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            MUSL_TARGET,
            "-p",
            "podscope-helper",
        ]))?;
    Ok(target_dir.join(MUSL_TARGET).join("release/podscope-helper"))
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn io<T>(r: std::io::Result<T>, what: &str) -> Result<T> {
    r.ctx(|| format!("building the image: {what}"))
}

/// The one layer, uncompressed: busybox, its applets, the helper, /etc basics.
fn layer(busybox: &[u8], applets: &[String], helper: &[u8]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["bin/", "etc/", "root/", "tmp/", "var/", "var/www/"] {
        let mode = if dir == "tmp/" { 0o1777 } else { 0o755 };
        let mut h = header(tar::EntryType::Directory, mode, 0);
        io(b.append_data(&mut h, dir, std::io::empty()), dir)?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    io(b.append_data(&mut h, "bin/busybox", busybox), "busybox")?;
    for a in applets {
        if a == "busybox" || a.contains('/') {
            continue;
        }
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        io(
            b.append_link(&mut h, format!("bin/{a}"), "busybox"),
            "applet link",
        )?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, helper.len() as u64);
    io(
        b.append_data(&mut h, "bin/podscope-helper", helper),
        "helper",
    )?;
    let files: [(&str, &str); 4] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n"),
        ("var/www/index.html", "podscope test node\n"),
    ];
    for (name, text) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, text.len() as u64);
        io(b.append_data(&mut h, name, text.as_bytes()), name)?;
    }
    io(b.into_inner(), "layer")
}

/// Builds the OCI layout archive at `out` from busybox and the helper.
pub fn build(busybox: &Path, helper: &Path, out: &Path) -> Result<Built> {
    let busybox_bytes = std::fs::read(busybox).ctx(|| {
        format!(
            "cannot read {} (install Debian's busybox-static)",
            busybox.display()
        )
    })?;
    let helper_bytes =
        std::fs::read(helper).ctx(|| format!("cannot read the helper {}", helper.display()))?;
    let applets: Vec<String> = run(Command::new(busybox).arg("--list"))?
        .lines()
        .map(str::to_string)
        .collect();
    let layer = layer(&busybox_bytes, &applets, &helper_bytes)?;
    let layer_digest = sha256(&layer);

    let mut blobs: Vec<(String, Vec<u8>)> = vec![(layer_digest.clone(), layer.clone())];
    let mut index_entries = Vec::new();
    let mut ids = Vec::new();
    for (name, cmd) in [
        (paths::IMAGE, vec!["/bin/sleep", "2147483647"]),
        (paths::PAUSE_IMAGE, vec!["/bin/podscope-helper", "pause"]),
    ] {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": [PATH_ENV], "Cmd": cmd, "WorkingDir": "/" },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        }))
        .map_err(|e| Error::Msg(format!("cannot encode the image config: {e}")))?;
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{layer_digest}"),
                "size": layer.len(),
            }],
        }))
        .map_err(|e| Error::Msg(format!("cannot encode the image manifest: {e}")))?;
        let manifest_digest = sha256(&manifest);
        index_entries.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                // ctr names the image after this annotation.
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "latest",
            },
        }));
        ids.push(format!("sha256:{config_digest}"));
        blobs.push((config_digest, config));
        blobs.push((manifest_digest, manifest));
    }
    let index = serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": index_entries }))
        .map_err(|e| Error::Msg(format!("cannot encode the image index: {e}")))?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        io(archive.append_data(&mut h, name, data), name)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for (digest, data) in &blobs {
        add(&format!("blobs/sha256/{digest}"), data)?;
    }
    let bytes = io(archive.into_inner(), "archive")?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    }
    let mut f = std::fs::File::create(out).ctx(|| format!("cannot write {}", out.display()))?;
    f.write_all(&bytes)
        .ctx(|| format!("cannot write {}", out.display()))?;
    Ok(Built {
        archive: out.to_path_buf(),
        image_id: ids[0].clone(),
        pause_id: ids[1].clone(),
    })
}

/// Builds the images and imports them unless containerd already has these
/// exact ids. Returns a line saying what it did.
pub async fn ensure(cri: &mut Cri) -> Result<String> {
    let helper = helper_binary()?;
    let built = build(
        Path::new(BUSYBOX),
        &helper,
        &paths::images_dir().join("podscope-images.tar"),
    )?;
    let have_image = cri.image_id(paths::IMAGE).await?;
    let have_pause = cri.image_id(paths::PAUSE_IMAGE).await?;
    if have_image.as_deref() == Some(built.image_id.as_str())
        && have_pause.as_deref() == Some(built.pause_id.as_str())
    {
        return Ok(format!(
            "images {} and {} already imported",
            paths::IMAGE,
            paths::PAUSE_IMAGE
        ));
    }
    run(Command::new("ctr")
        .args([
            "--address",
            paths::SOCKET,
            "-n",
            paths::CONTAINERD_NAMESPACE,
            "images",
            "import",
        ])
        .arg(&built.archive))?;
    let now = cri.image_id(paths::IMAGE).await?;
    if now.as_deref() != Some(built.image_id.as_str()) {
        return Err(Error::Msg(format!(
            "containerd did not pick up the imported image {} (it reports {now:?})",
            paths::IMAGE
        )));
    }
    Ok(format!(
        "imported {} ({}) and {} from {}",
        paths::IMAGE,
        &built.image_id[..19],
        paths::PAUSE_IMAGE,
        built.archive.display()
    ))
}
