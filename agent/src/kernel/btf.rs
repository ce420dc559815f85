//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF has no CO-RE field relocations, so podscope asks the running
//! kernel's BTF where the struct members it reads are, and hands those offsets
//! to its programs as load-time globals. This reader answers exactly the
//! questions that needs: a struct member's offset (through anonymous structs
//! and unions), an enum's values, and whether a function exists.
//!
//! It keeps the raw bytes and an index of where each type starts; nothing is
//! decoded until asked for. Format: include/uapi/linux/btf.h.
//!
//! Hostile or merely newer input: every walk through type references is
//! bounded (a reference cycle or a 100,000-deep array chain ends, never
//! overflows the stack), and a kind this reader does not know, from a
//! kernel newer than the agent, is skipped instead of failing the whole
//! blob. BTF does not record a type's length, so the length of an unknown
//! kind is found by trying the shapes every kind so far has had (a fixed
//! part and a per-element part) and keeping the one under which every
//! following type parses exactly to the end of the section; when none
//! does, the types before it are kept and lookups of later ones fail with
//! a sentence, for the probe that needs them only.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use thiserror::Error;

/// Where the running kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

static KERNEL_BTF_PATH: OnceLock<PathBuf> = OnceLock::new();

/// Sets where the running kernel's BTF is read from (`--btf PATH`, for
/// kernels built without `/sys/kernel/btf/vmlinux`: e.g. a BTF file from
/// BTFHub or one extracted with `pahole --btf_encode_detached`). Set once,
/// at start-up, before anything reads BTF; returns false if it was set already.
pub fn set_kernel_btf_path(path: PathBuf) -> bool {
    KERNEL_BTF_PATH.set(path).is_ok()
}

/// The running kernel's BTF file: `--btf`, else [`VMLINUX_BTF`].
pub fn kernel_btf_path() -> &'static Path {
    KERNEL_BTF_PATH
        .get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new(VMLINUX_BTF))
}

/// How deep a chain of type references (typedefs, qualifiers, arrays,
/// nested anonymous members) is followed: real kernels need fewer than 10.
const MAX_DEPTH: u32 = 32;
/// Distinct unknown kinds whose length is searched for (each multiplies
/// the search); beyond this the types after the unknown one are dropped.
const MAX_UNKNOWN_KINDS: usize = 2;

const BTF_MAGIC: u16 = 0xeb9f;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "this kernel publishes no BTF ({path} is missing): podscope needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (standard on Debian, Ubuntu, RHEL/Fedora and most cloud kernels since 5.x), \
         or this kernel's BTF in a file given with --btf PATH"
    )]
    Missing { path: String },
    #[error("cannot read BTF from {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("this kernel's BTF has no struct {name}{note}", name = .0, note = truncated_note(*.1))]
    NoStruct(String, Option<u32>),
    #[error("this kernel's BTF has no member {member} in struct {strukt}")]
    NoMember { strukt: String, member: String },
    #[error("this kernel's BTF has no enum {name}{note}", name = .0, note = truncated_note(*.1))]
    NoEnum(String, Option<u32>),
    #[error("this kernel's {0}, against the layout podscope's probes rely on")]
    Layout(String),
}

fn truncated_note(at: Option<u32>) -> String {
    at.map(|id| {
        format!(
            " (or it is among the types after id {id}, which follow a type of a kind this podscope does not know and were not read)"
        )
    })
    .unwrap_or_default()
}

/// BTF kinds (`BTF_KIND_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Void = 0,
    Int = 1,
    Ptr = 2,
    Array = 3,
    Struct = 4,
    Union = 5,
    Enum = 6,
    Fwd = 7,
    Typedef = 8,
    Volatile = 9,
    Const = 10,
    Restrict = 11,
    Func = 12,
    FuncProto = 13,
    Var = 14,
    Datasec = 15,
    Float = 16,
    DeclTag = 17,
    TypeTag = 18,
    Enum64 = 19,
}

impl Kind {
    fn from_u32(k: u32) -> Option<Kind> {
        use Kind::*;
        Some(match k {
            0 => Void,
            1 => Int,
            2 => Ptr,
            3 => Array,
            4 => Struct,
            5 => Union,
            6 => Enum,
            7 => Fwd,
            8 => Typedef,
            9 => Volatile,
            10 => Const,
            11 => Restrict,
            12 => Func,
            13 => FuncProto,
            14 => Var,
            15 => Datasec,
            16 => Float,
            17 => DeclTag,
            18 => TypeTag,
            19 => Enum64,
            _ => return None,
        })
    }

    /// The kinds looked up by name (`Btf::lookup`).
    fn is_looked_up(self) -> bool {
        matches!(
            self,
            Kind::Struct | Kind::Union | Kind::Enum | Kind::Enum64 | Kind::Func
        )
    }

    /// Bytes that follow the 12-byte common header for a type of this kind.
    fn extra_len(self, vlen: usize) -> usize {
        self.layout().len(vlen)
    }

    fn layout(self) -> Layout {
        use Kind::*;
        let (fixed, per_elem) = match self {
            Int | Var | DeclTag => (4, 0),
            Array => (12, 0),
            Struct | Union | Datasec | Enum64 => (0, 12),
            Enum | FuncProto => (0, 8),
            Void | Ptr | Fwd | Typedef | Volatile | Const | Restrict | Func | Float | TypeTag => {
                (0, 0)
            }
        };
        Layout { fixed, per_elem }
    }
}

/// How long a kind's data after the common header is: `fixed + vlen * per_elem`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    fixed: usize,
    per_elem: usize,
}

impl Layout {
    fn len(self, vlen: usize) -> usize {
        self.fixed + vlen * self.per_elem
    }

    /// The shapes a new kind is tried with, most common first: every shape
    /// a known kind has.
    const CANDIDATES: [Layout; 6] = [
        Layout {
            fixed: 0,
            per_elem: 0,
        },
        Layout {
            fixed: 4,
            per_elem: 0,
        },
        Layout {
            fixed: 0,
            per_elem: 12,
        },
        Layout {
            fixed: 0,
            per_elem: 8,
        },
        Layout {
            fixed: 12,
            per_elem: 0,
        },
        Layout {
            fixed: 4,
            per_elem: 4,
        },
    ];
}

/// The type section's index: where each type starts, and what was skipped.
#[derive(Default)]
struct TypeIndex {
    /// The id of `offsets[0]`.
    base: u32,
    offsets: Vec<u32>,
    /// (type id, kind) of each type of an unknown kind, skipped.
    unknown: Vec<(u32, u8)>,
    /// Set when the types after this id could not be read.
    truncated_at: Option<u32>,
}

/// Indexes the types in `data[at..end]`, learning the length of unknown
/// kinds as it goes (see the module comment). `known` holds the layouts
/// guessed so far for unknown kinds; a guess is kept only if the rest of
/// the section parses under it.
fn index_types(
    data: &[u8],
    mut at: usize,
    end: usize,
    str_len: usize,
    known: &mut HashMap<u8, Layout>,
    out: &mut TypeIndex,
) -> bool {
    let u32_at = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
    while at < end {
        if at + 12 > end {
            return false;
        }
        let (name_off, info) = (u32_at(at), u32_at(at + 4));
        if name_off as usize >= str_len.max(1) {
            return false;
        }
        let header = Header {
            name_off,
            info,
            size_or_type: 0,
        };
        let vlen = header.vlen();
        let raw_kind = ((info >> 24) & 0x1f) as u8;
        let layout = match header.kind() {
            Some(k) => k.layout(),
            None => match known.get(&raw_kind) {
                Some(l) => *l,
                None => {
                    if known.len() >= MAX_UNKNOWN_KINDS {
                        return false;
                    }
                    let id = out.base + out.offsets.len() as u32;
                    for cand in Layout::CANDIDATES {
                        let next = at + 12 + cand.len(vlen);
                        if next > end {
                            continue;
                        }
                        let mut rest = TypeIndex {
                            base: id + 1,
                            ..Default::default()
                        };
                        known.insert(raw_kind, cand);
                        if index_types(data, next, end, str_len, known, &mut rest) {
                            out.offsets.push(at as u32);
                            out.unknown.push((id, raw_kind));
                            out.offsets.extend(rest.offsets);
                            out.unknown.extend(rest.unknown);
                            return true;
                        }
                        known.remove(&raw_kind);
                    }
                    return false;
                }
            },
        };
        if header.kind().is_none() {
            out.unknown
                .push((out.base + out.offsets.len() as u32, raw_kind));
        }
        out.offsets.push(at as u32);
        at += 12 + layout.len(vlen);
    }
    at == end
}

/// Where a struct member lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the outer struct.
    pub offset: u32,
    /// Size in bytes of the member's type (0 when it has none, e.g. a function pointer's target).
    pub size: u32,
    /// Bitfield width, 0 for an ordinary member.
    pub bitfield_bits: u32,
    /// A bitfield's first bit within the byte at `offset` (0 for an ordinary member).
    pub bit: u32,
}

impl Member {
    /// Where to read the member as a little-endian u32 and which bits of
    /// that u32 are its own: the whole of an ordinary member of up to 4
    /// bytes, or a bitfield's bits (e.g. 6.18's `cfs_rq.throttled:1`, an
    /// `int` on older kernels).
    pub fn u32_mask(&self) -> u32 {
        match (self.bitfield_bits, self.size) {
            (0, s) if s >= 4 => u32::MAX,
            (0, s) => (1u32 << (8 * s)) - 1,
            (b, _) => (((1u64 << b) - 1) as u32) << self.bit,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Header {
    name_off: u32,
    info: u32,
    size_or_type: u32,
}

impl Header {
    fn kind(&self) -> Option<Kind> {
        Kind::from_u32((self.info >> 24) & 0x1f)
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kflag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// A parsed BTF blob (base BTF only; module split BTF is not needed here).
pub struct Btf {
    data: Vec<u8>,
    str_start: usize,
    str_len: usize,
    /// Byte offset (within `data`) of type id `i`; index 0 is `void`.
    offsets: Vec<u32>,
    /// Named struct/union/enum/func ids, sorted by (kind, name) and, for
    /// one name, by id, for binary search. A sorted list of ids costs 4
    /// bytes a name where a map of owned names cost about 70: this parse
    /// sets podscope's start-up memory peak (kept under 20 MiB in all).
    by_name: Vec<u32>,
    /// Kinds this reader does not know that the blob has (sorted, unique).
    unknown_kinds: std::collections::BTreeSet<u8>,
    skipped_types: usize,
    /// The types after this id could not be read.
    truncated_at: Option<u32>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.offsets.len())
            .finish()
    }
}

impl Btf {
    /// The running kernel's BTF (from `--btf PATH` when given).
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::from_file(kernel_btf_path())
    }

    /// Types of kinds this reader does not know, skipped; the kinds; and
    /// the id after which nothing could be read (if so).
    pub fn skipped(&self) -> (usize, Vec<u8>, Option<u32>) {
        (
            self.skipped_types,
            self.unknown_kinds.iter().copied().collect(),
            self.truncated_at,
        )
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Btf, BtfError> {
        let path = path.as_ref();
        let data = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BtfError::Missing {
                    path: path.display().to_string(),
                }
            } else {
                BtfError::Io {
                    path: path.display().to_string(),
                    source,
                }
            }
        })?;
        Btf::parse(data)
    }

    /// Parses a raw BTF blob (what `/sys/kernel/btf/vmlinux` and an ELF `.BTF` section hold).
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let bad = |m: &str| BtfError::Malformed(m.to_string());
        if data.len() < 24 {
            return Err(bad("shorter than its header"));
        }
        let magic = u16::from_le_bytes([data[0], data[1]]);
        if magic != BTF_MAGIC {
            return Err(if magic.swap_bytes() == BTF_MAGIC {
                bad("big-endian BTF is not supported")
            } else {
                bad("bad magic: not BTF")
            });
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let hdr_len = u32_at(4) as usize;
        let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
        let (str_off, str_len) = (u32_at(16) as usize, u32_at(20) as usize);
        let type_start = hdr_len
            .checked_add(type_off)
            .ok_or_else(|| bad("type section offset overflows"))?;
        let str_start = hdr_len
            .checked_add(str_off)
            .ok_or_else(|| bad("string section offset overflows"))?;
        if type_start.saturating_add(type_len) > data.len()
            || str_start.saturating_add(str_len) > data.len()
        {
            return Err(bad("sections run past the end of the data"));
        }

        if type_len % 4 != 0 {
            return Err(bad("the type section's length is not a multiple of 4"));
        }
        let end = type_start + type_len;
        let mut index = TypeIndex {
            offsets: vec![0u32],
            ..Default::default()
        };
        if !index_types(
            &data,
            type_start,
            end,
            str_len,
            &mut HashMap::new(),
            &mut index,
        ) {
            // Keep what reads cleanly up to the first type that does not:
            // everything if it is malformed, the types before an unknown
            // kind whose length no shape explains.
            let mut prefix = TypeIndex {
                offsets: vec![0u32],
                ..Default::default()
            };
            let mut at = type_start;
            while at + 12 <= end {
                let header = Header {
                    name_off: u32_at(at),
                    info: u32_at(at + 4),
                    size_or_type: 0,
                };
                let Some(kind) = header.kind() else { break };
                let next = at + 12 + kind.extra_len(header.vlen());
                if next > end || header.name_off as usize >= str_len.max(1) {
                    return Err(bad("a type runs past the type section"));
                }
                prefix.offsets.push(at as u32);
                at = next;
            }
            if at + 12 > end {
                return Err(bad("truncated type header"));
            }
            prefix.truncated_at = Some(prefix.offsets.len() as u32 - 1);
            index = prefix;
        }
        // Only the first few are logged: a kernel with a new kind has many.
        for (id, kind) in index.unknown.iter().take(3) {
            tracing::debug!("BTF type {id} has kind {kind}, unknown to this podscope: skipped");
        }
        if let Some(id) = index.truncated_at {
            tracing::warn!(
                "this kernel's BTF has a type kind this podscope does not know after type {id}; the types after it were not read (a newer podscope reads them)"
            );
        }

        let mut btf = Btf {
            data,
            str_start,
            str_len,
            offsets: index.offsets,
            unknown_kinds: index.unknown.iter().map(|u| u.1).collect(),
            skipped_types: index.unknown.len(),
            truncated_at: index.truncated_at,
            by_name: Vec::new(),
        };
        btf.index_names();
        Ok(btf)
    }

    fn index_names(&mut self) {
        let mut by_name: Vec<u32> = (1..self.offsets.len() as u32)
            .filter(|&id| {
                let h = self.header(id);
                h.name_off != 0 && h.kind().is_some_and(Kind::is_looked_up)
            })
            .collect();
        // Stable, so that among types of one name the first definition
        // comes first and wins (duplicates of one name are identical in vmlinux).
        by_name.sort_by(|&a, &b| self.name_key(a).cmp(&self.name_key(b)));
        self.by_name = by_name;
    }

    /// What `by_name` is sorted by.
    fn name_key(&self, id: u32) -> (u8, &str) {
        let h = self.header(id);
        (h.kind().map_or(0, |k| k as u8), self.str_at(h.name_off))
    }

    /// Number of types, `void` included.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.len() <= 1
    }

    fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes([
            self.data[o],
            self.data[o + 1],
            self.data[o + 2],
            self.data[o + 3],
        ])
    }

    fn header(&self, id: u32) -> Header {
        let o = self.offsets[id as usize] as usize;
        Header {
            name_off: self.u32_at(o),
            info: self.u32_at(o + 4),
            size_or_type: self.u32_at(o + 8),
        }
    }

    fn str_at(&self, off: u32) -> &str {
        let off = off as usize;
        if off >= self.str_len {
            return "";
        }
        let s = &self.data[self.str_start + off..self.str_start + self.str_len];
        let len = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..len]).unwrap_or("")
    }

    fn lookup(&self, kind: Kind, name: &str) -> Option<u32> {
        let key = (kind as u8, name);
        let first = self.by_name.partition_point(|&id| self.name_key(id) < key);
        let id = *self.by_name.get(first)?;
        (self.name_key(id) == key).then_some(id)
    }

    /// Whether the kernel has a function of this name (a candidate for fentry/kprobe).
    pub fn has_func(&self, name: &str) -> bool {
        self.lookup(Kind::Func, name).is_some()
    }

    /// Whether the kernel has a struct of this name.
    pub fn has_struct(&self, name: &str) -> bool {
        self.lookup(Kind::Struct, name).is_some()
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn strip(&self, mut id: u32) -> u32 {
        for _ in 0..MAX_DEPTH {
            if id == 0 || id as usize >= self.offsets.len() {
                return 0;
            }
            let h = self.header(id);
            match h.kind() {
                Some(
                    Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag,
                ) => id = h.size_or_type,
                _ => return id,
            }
        }
        0
    }

    /// Size in bytes of a type, following typedefs and arrays.
    fn size_of(&self, id: u32) -> u32 {
        self.size_of_at(id, 0)
    }

    fn size_of_at(&self, id: u32, depth: u32) -> u32 {
        if depth > MAX_DEPTH {
            return 0;
        }
        let id = self.strip(id);
        if id == 0 {
            return 0;
        }
        let h = self.header(id);
        match h.kind() {
            Some(
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec,
            ) => h.size_or_type,
            Some(Kind::Ptr) => 8,
            Some(Kind::Array) => {
                let o = self.offsets[id as usize] as usize + 12;
                let elem = self.u32_at(o);
                let nelems = self.u32_at(o + 8);
                self.size_of_at(elem, depth + 1).saturating_mul(nelems)
            }
            _ => 0,
        }
    }

    /// The byte offset of `member` in `struct strukt`. Members of anonymous
    /// structs and unions nested in it are found too, as C would.
    pub fn member(&self, strukt: &str, member: &str) -> Result<Member, BtfError> {
        let id = self
            .lookup(Kind::Struct, strukt)
            .or_else(|| self.lookup(Kind::Union, strukt))
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string(), self.truncated_at))?;
        self.find_member(id, member, 0)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_string(),
                member: member.to_string(),
            })
    }

    /// Convenience: the byte offset only.
    pub fn offset_of(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        self.member(strukt, member).map(|m| m.offset)
    }

    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<Member> {
        if depth > MAX_DEPTH {
            return None;
        }
        let h = self.header(id);
        let start = self.offsets[id as usize] as usize + 12;
        for i in 0..h.vlen() {
            let o = start + i * 12;
            let (m_name, m_type, m_off) = (self.u32_at(o), self.u32_at(o + 4), self.u32_at(o + 8));
            let (bit_off, bits) = if h.kflag() {
                (m_off & 0x00ff_ffff, m_off >> 24)
            } else {
                (m_off, 0)
            };
            if m_name == 0 {
                // Anonymous struct or union: its members belong to this struct.
                let inner = self.strip(m_type);
                if inner != 0
                    && matches!(self.header(inner).kind(), Some(Kind::Struct | Kind::Union))
                    && let Some(found) = self.find_member(inner, name, depth + 1)
                {
                    return Some(Member {
                        offset: found.offset + bit_off / 8,
                        ..found
                    });
                }
                continue;
            }
            if self.str_at(m_name) == name {
                return Some(Member {
                    offset: bit_off / 8,
                    size: self.size_of(m_type),
                    bitfield_bits: bits,
                    bit: if bits == 0 { 0 } else { bit_off % 8 },
                });
            }
        }
        None
    }

    /// Every (name, value) of an enum (32- or 64-bit).
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let (id, wide) = match self.lookup(Kind::Enum, name) {
            Some(id) => (id, false),
            None => (
                self.lookup(Kind::Enum64, name)
                    .ok_or_else(|| BtfError::NoEnum(name.to_string(), self.truncated_at))?,
                true,
            ),
        };
        let h = self.header(id);
        let signed = h.kflag();
        let start = self.offsets[id as usize] as usize + 12;
        let stride = if wide { 12 } else { 8 };
        Ok((0..h.vlen())
            .map(|i| {
                let o = start + i * stride;
                let lo = self.u32_at(o + 4);
                let value = if wide {
                    (((self.u32_at(o + 8) as u64) << 32) | lo as u64) as i64
                } else if signed {
                    lo as i32 as i64
                } else {
                    lo as i64
                };
                (self.str_at(self.u32_at(o)).to_string(), value)
            })
            .collect())
    }

    /// One enumerator's value.
    pub fn enum_value(&self, name: &str, variant: &str) -> Result<Option<i64>, BtfError> {
        Ok(self
            .enum_values(name)?
            .into_iter()
            .find(|(n, _)| n == variant)
            .map(|(_, v)| v))
    }
}

/// For unit tests of the running kernel: its BTF, or None after a visible
/// `SKIPPED` line (libtest captures eprintln!, and `cargo xtask test` counts
/// these lines as skips). When tests are required, a missing BTF fails.
#[cfg(test)]
pub(crate) fn running_kernel_for_test(test: &str) -> Option<Btf> {
    use std::io::Write;
    match Btf::from_sys_fs() {
        Ok(btf) => Some(btf),
        Err(e) => {
            assert!(
                std::env::var("PODSCOPE_REQUIRE_KERNEL_TESTS").as_deref() != Ok("1"),
                "{test}: {e}, and PODSCOPE_REQUIRE_KERNEL_TESTS=1"
            );
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no {VMLINUX_BTF}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob by hand, to test the parser on shapes we control.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: vec![],
                strings: vec![0],
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn hdr(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size: u32) {
            let n = self.s(name);
            let info = (kind << 24) | vlen | if kflag { 1 << 31 } else { 0 };
            for v in [n, info, size] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }
        fn u32s(&mut self, vals: &[u32]) {
            for v in vals {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
        }
        fn build(self) -> Vec<u8> {
            let mut out = vec![];
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.push(1);
            out.push(0);
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        // 1: int (4 bytes)
        b.hdr("int", 1, 0, false, 4);
        b.u32s(&[32]);
        // 2: typedef pid_t -> int
        b.hdr("pid_t", 8, 0, false, 1);
        // 3: anonymous union { int a; pid_t b; }
        b.hdr("", 5, 2, false, 4);
        let (a, bb) = (b.s("a"), b.s("b"));
        b.u32s(&[a, 1, 0, bb, 2, 0]);
        // 4: struct task { int x; <anon union> at byte 8; pid_t tgid at byte 16; bitfield f:3 at bit 160 }
        b.hdr("task", 4, 4, true, 24);
        let (x, tgid, f) = (b.s("x"), b.s("tgid"), b.s("f"));
        b.u32s(&[x, 1, 0, 0, 3, 64, tgid, 2, 128, f, 1, (3 << 24) | 160]);
        // 5: enum reason { A = 1, B = -2 } (signed)
        b.hdr("reason", 6, 2, true, 4);
        let (ea, eb) = (b.s("A"), b.s("B"));
        b.u32s(&[ea, 1, eb, (-2i32) as u32]);
        // 6: func do_exit
        b.hdr("do_exit", 12, 0, false, 0);
        // 7: enum64 big { HUGE = 1 << 40 }
        b.hdr("big", 19, 1, false, 8);
        let h = b.s("HUGE");
        b.u32s(&[h, 0, 1 << 8]);
        b.build()
    }

    #[test]
    fn reads_members_through_typedefs_and_anonymous_unions() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.len(), 8);
        assert_eq!(btf.offset_of("task", "x").unwrap(), 0);
        assert_eq!(
            btf.member("task", "tgid").unwrap(),
            Member {
                offset: 16,
                size: 4,
                bitfield_bits: 0,
                bit: 0,
            }
        );
        assert_eq!(btf.offset_of("task", "a").unwrap(), 8);
        assert_eq!(btf.offset_of("task", "b").unwrap(), 8);
        assert_eq!(btf.member("task", "f").unwrap().bitfield_bits, 3);
        assert_eq!(btf.member("task", "f").unwrap().offset, 20);
        assert!(matches!(
            btf.offset_of("task", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.offset_of("nope", "x"),
            Err(BtfError::NoStruct(..))
        ));
    }

    #[test]
    fn reads_enums_and_funcs() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(
            btf.enum_values("reason").unwrap(),
            vec![("A".into(), 1), ("B".into(), -2)]
        );
        assert_eq!(btf.enum_value("big", "HUGE").unwrap(), Some(1 << 40));
        assert!(btf.has_func("do_exit"));
        assert!(!btf.has_func("task"));
        assert!(matches!(
            btf.enum_values("missing"),
            Err(BtfError::NoEnum(..))
        ));
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        assert!(matches!(Btf::parse(vec![]), Err(BtfError::Malformed(_))));
        assert!(matches!(
            Btf::parse(vec![0; 64]),
            Err(BtfError::Malformed(_))
        ));
        let mut be = sample();
        be.swap(0, 1);
        let err = Btf::parse(be).unwrap_err().to_string();
        assert!(err.contains("big-endian"), "{err}");
        // Every truncation of a valid blob is an error, never a panic.
        let good = sample();
        for len in 0..good.len() {
            assert!(
                Btf::parse(good[..len].to_vec()).is_err(),
                "truncated at {len}"
            );
        }
        // A type section that claims more than there is.
        let mut long = sample();
        long[12] = 0xff;
        assert!(Btf::parse(long).is_err());
    }

    /// A kind this reader does not know, from a newer kernel, is skipped:
    /// its length is learnt from the types after it.
    #[test]
    fn unknown_kinds_are_skipped() {
        let mut b = Builder::new();
        b.hdr("int", 1, 0, false, 4);
        b.u32s(&[32]);
        // 2: kind 25, two 8-byte elements; 3: kind 26 with vlen 0.
        b.hdr("future", 25, 2, false, 0);
        b.u32s(&[1, 2, 3, 4]);
        b.hdr("", 26, 0, false, 0);
        // 4: struct s { int a at byte 4 }
        b.hdr("s", 4, 1, false, 8);
        let a = b.s("a");
        b.u32s(&[a, 1, 32]);
        // 5: kind 25 again, one element.
        b.hdr("", 25, 1, false, 0);
        b.u32s(&[5, 6]);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.len(), 6);
        assert_eq!(
            btf.member("s", "a").unwrap(),
            Member {
                offset: 4,
                size: 4,
                bitfield_bits: 0,
                bit: 0
            }
        );
        assert_eq!(btf.skipped(), (3, vec![25, 26], None));
    }

    /// An unknown kind whose length no shape explains: the types before it
    /// are kept, lookups of the others fail with a sentence, nothing panics.
    #[test]
    fn an_unexplained_kind_keeps_the_types_before_it() {
        let mut b = Builder::new();
        b.hdr("s", 4, 1, false, 4);
        let a = b.s("a");
        b.u32s(&[a, 0, 0]);
        b.hdr("odd", 27, 0, false, 0);
        b.types.extend_from_slice(&[0xff; 20]);
        b.hdr("t", 4, 0, false, 4);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.offset_of("s", "a").unwrap(), 0);
        let err = btf.offset_of("t", "a").unwrap_err().to_string();
        assert!(err.contains("after id 1"), "{err}");
        assert_eq!(btf.skipped().2, Some(1));
    }

    /// Reference chains and cycles end: a 100,000-deep array of arrays and
    /// a typedef cycle cost a bounded walk, never the stack.
    #[test]
    fn reference_walks_are_bounded() {
        let mut b = Builder::new();
        b.hdr("int", 1, 0, false, 4);
        b.u32s(&[32]);
        let depth = 100_000u32;
        for id in 2..depth + 2 {
            b.hdr("", 3, 0, false, 0);
            b.u32s(&[id - 1, 1, 2]);
        }
        let deep = depth + 1;
        // Two typedefs naming each other.
        let (t1, t2) = (deep + 1, deep + 2);
        b.hdr("loop_a", 8, 0, false, t2);
        b.hdr("loop_b", 8, 0, false, t1);
        b.hdr("s", 4, 2, false, 8);
        let (x, y) = (b.s("x"), b.s("y"));
        b.u32s(&[x, deep, 0, y, t1, 32]);
        let btf = Btf::parse(b.build()).unwrap();
        assert_eq!(btf.member("s", "x").unwrap().size, 0);
        assert_eq!(btf.member("s", "y").unwrap().size, 0);
        assert_eq!(btf.offset_of("s", "y").unwrap(), 4);
    }

    /// The Debian 6.1 kernel's BTF as a newer kernel might ship it: two of
    /// its kinds renumbered to kinds this reader does not know. Every offset
    /// still comes out as pahole says.
    #[test]
    fn a_real_kernel_with_unknown_kinds_still_resolves() {
        let mut data = super::super::fixtures::debian_6_1_btf_bytes();
        let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
        let hdr_len = u32_at(&data, 4) as usize;
        let start = hdr_len + u32_at(&data, 8) as usize;
        let end = start + u32_at(&data, 12) as usize;
        let mut at = start;
        let mut renamed = 0;
        while at < end {
            let info = u32_at(&data, at + 4);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let len = Kind::from_u32(kind).unwrap().extra_len(vlen);
            let new_kind = match kind {
                13 => 29, // FUNC_PROTO
                17 => 30, // DECL_TAG
                _ => kind,
            };
            if new_kind != kind {
                renamed += 1;
                let info = (info & !(0x1f << 24)) | (new_kind << 24);
                data[at + 4..at + 8].copy_from_slice(&info.to_le_bytes());
            }
            at += 12 + len;
        }
        let btf = Btf::parse(data).unwrap();
        let (skipped, kinds, truncated) = btf.skipped();
        assert_eq!((skipped, truncated), (renamed, None));
        assert!(kinds.contains(&29), "{kinds:?}");
        assert_eq!(btf.offset_of("task_struct", "exit_code").unwrap(), 2312);
        assert_eq!(btf.offset_of("task_struct", "tgid").unwrap(), 2420);
        assert_eq!(btf.member("task_struct", "comm").unwrap().size, 16);
        assert_eq!(btf.offset_of("signal_struct", "flags").unwrap(), 116);
    }

    #[test]
    fn missing_file_says_what_to_do() {
        let err = Btf::from_file("/nonexistent/vmlinux")
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }

    /// `pahole -C` output committed beside the BTF blob (agent/fixtures/):
    /// a top-level member's byte offset, from its `/* offset size */` comment.
    fn pahole_offset(structure: &str, member: &str) -> Option<u32> {
        const PAHOLE: &str = include_str!("../../fixtures/pahole-6.1.0-47-cloud-amd64.txt");
        let body = PAHOLE.split(&format!("struct {structure} {{\n")).nth(1)?;
        let body = &body[..body.find("\n}")?];
        body.lines()
            // Top-level members only: one tab of indentation.
            .filter(|l| l.starts_with('\t') && !l.starts_with("\t\t"))
            .find_map(|l| {
                let (decl, comment) = l.split_once(';')?;
                let name = decl.split_whitespace().last()?;
                let name = name.trim_start_matches('*');
                let name = name.split(['[', ':']).next()?;
                (name == member).then_some(())?;
                comment
                    .trim()
                    .strip_prefix("/*")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    }

    #[test]
    fn the_recorded_6_1_offsets_match_pahole() {
        let btf = super::super::fixtures::debian_6_1_btf();
        for (structure, member) in [
            ("task_struct", "exit_code"),
            ("task_struct", "pid"),
            ("task_struct", "tgid"),
            ("task_struct", "real_parent"),
            ("task_struct", "group_leader"),
            ("task_struct", "start_boottime"),
            ("task_struct", "comm"),
            ("task_struct", "signal"),
            ("task_struct", "se"),
            ("signal_struct", "live"),
            ("signal_struct", "flags"),
            ("signal_struct", "group_exec_task"),
            ("sched_entity", "cfs_rq"),
            ("cfs_rq", "throttled"),
            ("cfs_rq", "throttle_count"),
        ] {
            let want = pahole_offset(structure, member)
                .unwrap_or_else(|| panic!("{structure}.{member} is not in the pahole output"));
            assert_eq!(
                btf.offset_of(structure, member).unwrap(),
                want,
                "{structure}.{member}"
            );
        }
    }

    #[test]
    fn parses_the_recorded_debian_6_1_kernel() {
        let btf = super::super::fixtures::debian_6_1_btf();
        assert!(btf.len() > 50_000, "{} types", btf.len());
        // Values read off this kernel's BTF with pahole (dwarves), independently of
        // this parser: agent/fixtures/pahole-6.1.0-47-cloud-amd64.txt.
        assert_eq!(btf.offset_of("task_struct", "exit_code").unwrap(), 2312);
        assert_eq!(btf.offset_of("task_struct", "pid").unwrap(), 2416);
        assert_eq!(btf.offset_of("task_struct", "tgid").unwrap(), 2420);
        assert_eq!(
            btf.offset_of("task_struct", "start_boottime").unwrap(),
            2784
        );
        assert_eq!(btf.offset_of("signal_struct", "live").unwrap(), 4);
        assert_eq!(btf.offset_of("signal_struct", "flags").unwrap(), 116);
        assert_eq!(btf.member("task_struct", "comm").unwrap().size, 16);
        assert_eq!(
            btf.member("task_struct", "signal").unwrap(),
            Member {
                offset: 3072,
                size: 8,
                bitfield_bits: 0,
                bit: 0,
            }
        );
        // skb drop reasons: NO_SOCKET is 2 on 6.1 (3 on later kernels).
        assert_eq!(
            btf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NO_SOCKET")
                .unwrap(),
            Some(2)
        );
        assert!(btf.has_func("do_exit"));
        assert!(btf.has_struct("signal_struct"));
    }

    #[test]
    fn parses_the_running_kernel_when_it_has_btf() {
        let Some(btf) = running_kernel_for_test("parses_the_running_kernel_when_it_has_btf") else {
            return;
        };
        assert!(btf.offset_of("task_struct", "exit_code").unwrap() > 0);
        assert_eq!(btf.member("task_struct", "comm").unwrap().size, 16);
        assert!(btf.has_func("do_exit"));
    }
}
