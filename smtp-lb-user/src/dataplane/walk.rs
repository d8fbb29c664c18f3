//! Reading every entry of a map fast. `BPF_MAP_LOOKUP_BATCH` (Linux 5.6)
//! copies thousands of entries per syscall where iterating costs two
//! syscalls per entry (aya 0.14 has no batch API): walking the whole
//! `FLOW_TABLE` (16 MiB) or a full `MOVED_FLOWS` takes milliseconds instead
//! of seconds. Its cursor is a bucket (or array) index, so entries evicted
//! meanwhile cannot restart the walk.
use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Pod,
    maps::{Array, HashMap, Map, MapError},
};
use smtp_lb_common::{Flow, FlowKey, FlowSet};

/// Every tracked flow of the `FLOW_TABLE` array `map`: the sealed, non-empty
/// ways of every set.
pub fn flow_table(map: &Map) -> Result<Vec<(FlowKey, Flow)>, MapError> {
    let sets: Vec<FlowSet> = if let Map::Array(_) = map {
        match entries::<u32, FlowSet>(map, usize::MAX) {
            Ok(sets) => sets.into_iter().map(|(_, set)| set).collect(),
            // No batch ops on arrays: one lookup per set.
            Err(MapError::InvalidMapType { .. }) => {
                let array: Array<&aya::maps::MapData, FlowSet> = Array::try_from(map)?;
                array.iter().collect::<Result<_, _>>()?
            }
            Err(e) => return Err(e),
        }
    } else {
        return Err(MapError::InvalidMapType { map_type: 0 });
    };
    Ok(sets
        .iter()
        .flat_map(|set| set.ways.iter())
        .filter_map(|way| Some((way.key, way.flow()?)))
        .collect())
}

/// `BPF_MAP_LOOKUP_BATCH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: u32 = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every `(key, value)` of the hash map or array `map`, read in batches;
/// falls back to iterating (at most `limit` entries) where the kernel has
/// no batch ops.
pub fn entries<K: Pod + Default, V: Pod + Default>(
    map: &Map,
    limit: usize,
) -> Result<Vec<(K, V)>, MapError> {
    let fd = match map {
        Map::HashMap(data) | Map::LruHashMap(data) | Map::Array(data) => {
            data.fd().as_fd().as_raw_fd()
        }
        _ => return Err(MapError::InvalidMapType { map_type: 0 }),
    };
    let mut out = Vec::new();
    let mut keys = vec![K::default(); CHUNK as usize];
    let mut values = vec![V::default(); CHUNK as usize];
    // Hash maps use a u32 bucket index as the cursor, arrays a u32 index.
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const cursor_in) as u64
            },
            out_batch: (&raw mut cursor_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd.cast_unsigned(),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the
        // map's key and value types, and at two live u32 cursors.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let errno = std::io::Error::last_os_error();
        let got = attr.count as usize;
        out.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        if rc == 0 {
            cursor_in = cursor_out;
            first = false;
            continue;
        }
        match errno.raw_os_error() {
            // The last batch.
            Some(libc::ENOENT) => return Ok(out),
            // No batch ops on this kernel or map type.
            Some(libc::EINVAL | libc::EOPNOTSUPP) if first => break,
            _ => {
                return Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_lookup_batch",
                    io_error: errno,
                }));
            }
        }
    }
    let map: HashMap<&aya::maps::MapData, K, V> = HashMap::try_from(map)?;
    map.iter().take(limit).collect()
}
