//! Moving a running guest's NBD disk to another export of its volume (the one its storage
//! node serves at the volume's grown size) and telling the guest the new size, through
//! QEMU's monitor (libvirt's QMP passthrough): what libvirt 9.0 cannot do. Its block resize
//! asks QEMU's NBD client to grow, which it refuses, and an NBD export keeps the size it was
//! opened with, so a grown volume is served by a new export beside the first.
//!
//! # The move
//! libvirt names a disk's nodes `libvirt-<N>-storage` (the NBD client) and
//! `libvirt-<N>-format` (raw, under the guest's device), N being the `index` of its
//! `<source>` in the live XML. Each step is chosen by [`next`] from QEMU's block graph as it
//! is read before the step, so a move cut short anywhere (the agent killed) is finished by
//! the next pass, and one done is a no-op:
//! 1. an NBD node `stratus-<N>-moving` on the new export (with the TLS credentials object
//!    libvirt made for the disk), and the format node reopened (`blockdev-reopen`) onto it:
//!    the guest's I/O goes on, drained and resumed by QEMU;
//! 2. `block_resize` of the format node to the new node's size: the raw driver truncates its
//!    NBD child to exactly the export's size (which QEMU's NBD client accepts) and virtio-blk
//!    tells the guest (the format node may have its new size since the reopen, but only a
//!    resize tells the guest); then, in the same step, the old storage node deleted (its
//!    connection ends, and the storage node then ends the old export);
//! 3. a new `libvirt-<N>-storage` on the new export, the format node reopened onto it, the
//!    temporary node deleted: libvirt finds the nodes it named when it unplugs the disk.
//!
//! The live XML still names the first export (libvirt is not told): [`moved_path`] gives the
//! export QEMU reads, and the domain's definition is rewritten by the caller.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// What the block graph shows of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The export it reads, for an NBD node: (port, export name).
    pub export: Option<(u16, String)>,
    /// Its size, in bytes.
    pub size: u64,
}

/// What QEMU shows of one disk's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Every named node.
    pub nodes: BTreeMap<String, Node>,
    /// The node under the disk's format node (`file`).
    pub under_format: Option<String>,
}

/// One step of a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// Add an NBD node of this name on the new export.
    Add(String),
    /// Reopen the format node onto this node.
    Reopen(String),
    /// Delete this node.
    Delete(String),
    /// Grow the format node to this many bytes (the guest is told).
    Resize(u64),
    /// Tell the guest the size of the export it now reads (`block_resize` of the format
    /// node to it, which notifies the guest even when the format node took that size when
    /// it was reopened), then delete this node (the old one): done again, both are no-ops
    /// but for the guest being told again.
    Leave(u64, String),
    /// The disk reads the new export at its size.
    Done,
}

/// libvirt's name of the storage node of the disk whose source has index `index`.
pub fn storage(index: u32) -> String {
    format!("libvirt-{index}-storage")
}

/// libvirt's name of the format node of the disk whose source has index `index`.
pub fn format(index: u32) -> String {
    format!("libvirt-{index}-format")
}

/// The temporary node of a move (31 bytes at most, as QEMU's node names).
pub fn moving(index: u32) -> String {
    format!("stratus-{index}-moving")
}

/// The next step moving the disk of source index `index`, as `seen`, to export `want`.
///
/// # Errors
/// The format node reads none of the nodes a move makes or keeps (not a disk as libvirt
/// makes it, or another program moved it).
pub fn next(seen: &Seen, index: u32, want: &(u16, String)) -> Result<Act, String> {
    let (storage, temp, format) = (storage(index), moving(index), format(index));
    let on_want = |n: &str| {
        seen.nodes
            .get(n)
            .is_some_and(|x| x.export.as_ref() == Some(want))
    };
    let has = |n: &str| seen.nodes.contains_key(n);
    let size = |n: &str| seen.nodes.get(n).map_or(0, |x| x.size);
    match seen.under_format.as_deref() {
        Some(u) if u == storage && on_want(&storage) => {
            if has(&temp) {
                Ok(Act::Delete(temp))
            } else if size(&format) < size(&storage) {
                Ok(Act::Resize(size(&storage)))
            } else {
                Ok(Act::Done)
            }
        }
        Some(u) if u == storage => {
            if has(&temp) && !on_want(&temp) {
                Ok(Act::Delete(temp))
            } else if has(&temp) {
                Ok(Act::Reopen(temp))
            } else {
                Ok(Act::Add(temp))
            }
        }
        Some(u) if u == temp => {
            if has(&storage) && on_want(&storage) {
                Ok(Act::Reopen(storage))
            } else if has(&storage) {
                Ok(Act::Leave(size(&temp), storage))
            } else {
                Ok(Act::Add(storage))
            }
        }
        other => Err(format!(
            "QEMU's node {format} reads {other:?}, neither {storage} nor {temp}"
        )),
    }
}

/// The (port, export name) an NBD node's file name names: `nbd://HOST:PORT/NAME` (an IPv4
/// or DNS host), or `json:{…}` with `server.port` and `export` (an IPv6 host).
pub fn export_of(filename: &str) -> Option<(u16, String)> {
    if let Some(rest) = filename.strip_prefix("nbd://") {
        let (hostport, name) = rest.split_once('/')?;
        let (_, port) = hostport.rsplit_once(':')?;
        return Some((port.parse().ok()?, name.to_owned()));
    }
    let v: Value = serde_json::from_str(filename.strip_prefix("json:")?).ok()?;
    let port = match &v["server"]["port"] {
        Value::String(p) => p.parse().ok()?,
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        _ => return None,
    };
    Some((port, v["export"].as_str()?.to_owned()))
}

/// What QEMU shows of its nodes: `query-named-block-nodes` (flat) and
/// `x-debug-query-block-graph` replies (their `return`), for the format node `format`.
pub fn seen(named: &Value, graph: &Value, format: &str) -> Seen {
    let mut out = Seen::default();
    for n in named.as_array().into_iter().flatten() {
        let Some(name) = n["node-name"].as_str() else {
            continue;
        };
        let export = (n["drv"] == "nbd")
            .then(|| n["file"].as_str().and_then(export_of))
            .flatten();
        let size = n["image"]["virtual-size"].as_u64().unwrap_or_default();
        out.nodes.insert(name.to_owned(), Node { export, size });
    }
    let nodes = graph["nodes"].as_array().cloned().unwrap_or_default();
    let id_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["id"].as_u64())
    };
    let name_of = |id: u64| {
        nodes
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .and_then(|n| n["name"].as_str())
    };
    if let Some(parent) = id_of(format) {
        out.under_format = graph["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["parent"].as_u64() == Some(parent) && e["name"] == "file")
            .and_then(|e| name_of(e["child"].as_u64()?))
            .map(str::to_owned);
    }
    out
}

/// The NBD node `name` on `host`:`port`, export `export`, with the TLS credentials object
/// `tls` (libvirt's for the disk), its cache mode as the disk's (`cache`, as
/// `query-named-block-nodes` shows it).
pub fn add_command(
    name: &str,
    host: &str,
    want: &(u16, String),
    tls: Option<&str>,
    cache: &Value,
) -> Value {
    let mut args = json!({
        "driver": "nbd",
        "node-name": name,
        "server": {"type": "inet", "host": host, "port": want.0.to_string()},
        "export": want.1,
        "cache": {
            "direct": cache["direct"].as_bool().unwrap_or(true),
            "no-flush": cache["no-flush"].as_bool().unwrap_or(false),
        },
        "auto-read-only": true,
        "discard": "unmap",
    });
    if let Some(t) = tls {
        args["tls-creds"] = json!(t);
    }
    json!({"execute": "blockdev-add", "arguments": args})
}

/// The format node `format` (raw) reopened onto `file`, its other options as QEMU shows them
/// (`node`: its `query-named-block-nodes` entry): read-only, cache, detect-zeroes.
pub fn reopen_command(format: &str, file: &str, node: &Value) -> Value {
    let cache = &node["cache"];
    json!({"execute": "blockdev-reopen", "arguments": {"options": [{
        "node-name": format,
        "driver": "raw",
        "file": file,
        "read-only": node["ro"].as_bool().unwrap_or(false),
        "cache": {
            "direct": cache["direct"].as_bool().unwrap_or(true),
            "no-flush": cache["no-flush"].as_bool().unwrap_or(false),
        },
        "detect-zeroes": node["detect_zeroes"].as_str().unwrap_or("off"),
    }]}})
}

/// The `return` of a QMP reply, or its error's description.
///
/// # Errors
/// The reply's `error`, or a reply that is not QMP's.
pub fn returned(reply: &str) -> Result<Value, String> {
    let mut v: Value =
        serde_json::from_str(reply).map_err(|e| format!("a reply that is not JSON: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(e["desc"].as_str().unwrap_or("an error").to_owned());
    }
    match v.get_mut("return") {
        Some(r) => Ok(r.take()),
        None => Err(format!("a reply with no return: {reply}")),
    }
}

/// The TLS credentials object of the storage node `storage` among QEMU's objects (a
/// `qom-list /objects` return): libvirt names it after the node (`obj<node>_tls0`).
pub fn tls_object(objects: &Value, storage: &str) -> Option<String> {
    objects
        .as_array()?
        .iter()
        .filter(|o| o["type"] == "child<tls-creds-x509>")
        .filter_map(|o| o["name"].as_str())
        .find(|n| n.contains(storage))
        .map(str::to_owned)
}

/// The index of the `<source>` of the disk at guest name `target` in a domain's live XML.
pub fn disk_index(xml: &str, target: &str) -> Option<u32> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let (mut in_disk, mut depth_backing) = (false, 0u32);
    let (mut index, mut dev) = (None, None);
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == "disk" => {
                in_disk = true;
                (index, dev) = (None, None);
            }
            Event::Start(e) if in_disk && e.local_name().as_ref() == "backingStore" => {
                depth_backing += 1;
            }
            Event::End(e) if e.local_name().as_ref() == "backingStore" => {
                depth_backing = depth_backing.saturating_sub(1);
            }
            Event::Start(e) | Event::Empty(e) if in_disk && depth_backing == 0 => {
                let attr = |k: &str| {
                    e.attributes()
                        .flatten()
                        .find(|a| a.key.local_name().as_ref() == k)
                        .and_then(|a| {
                            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .ok()
                                .map(std::borrow::Cow::into_owned)
                        })
                };
                match e.local_name().as_ref() {
                    "source" if index.is_none() => {
                        index = attr("index").and_then(|i| i.parse().ok());
                    }
                    "target" => dev = attr("dev"),
                    _ => {}
                }
            }
            Event::End(e) if e.local_name().as_ref() == "disk" => {
                in_disk = false;
                if dev.as_deref() == Some(target) {
                    return index;
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// `path` (an NBD disk's, `nbd[+tls]://HOST:PORT/NAME`) on export `want` of the same host.
pub fn moved_path(path: &std::path::Path, want: &(u16, String)) -> Option<std::path::PathBuf> {
    let s = path.to_str()?;
    let (scheme, rest) = s.split_once("://")?;
    let (hostport, _) = rest.split_once('/')?;
    let (host, _) = hostport.rsplit_once(':')?;
    Some(format!("{scheme}://{host}:{}/{}", want.0, want.1).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want() -> (u16, String) {
        (10810, "new".to_owned())
    }

    fn node(export: Option<(u16, &str)>, size: u64) -> Node {
        Node {
            export: export.map(|(p, n)| (p, n.to_owned())),
            size,
        }
    }

    /// The disk of index 1 with `nodes` (name, export, size), its format node reading `under`.
    /// A node as a test names it: its name, the export it reads, its size.
    type Named<'a> = (&'a str, Option<(u16, &'a str)>, u64);

    fn at(under: &str, nodes: &[Named<'_>]) -> Seen {
        let mut s = Seen {
            under_format: Some(under.to_owned()),
            ..Seen::default()
        };
        s.nodes
            .insert("libvirt-1-format".into(), node(None, 1 << 30));
        for (n, e, size) in nodes {
            s.nodes.insert((*n).to_owned(), node(*e, *size));
        }
        s
    }

    const OLD: Option<(u16, &str)> = Some((10809, "old"));
    const NEW: Option<(u16, &str)> = Some((10810, "new"));
    const GIB: u64 = 1 << 30;

    #[test]
    fn a_move_goes_step_by_step_from_wherever_it_was_cut_short() {
        let s = "libvirt-1-storage";
        let t = "stratus-1-moving";
        let steps = [
            (at(s, &[(s, OLD, GIB)]), Act::Add(t.into())),
            (
                at(s, &[(s, OLD, GIB), (t, NEW, 2 * GIB)]),
                Act::Reopen(t.into()),
            ),
            (
                at(t, &[(s, OLD, GIB), (t, NEW, 2 * GIB)]),
                Act::Leave(2 * GIB, s.into()),
            ),
            (at(t, &[(t, NEW, 2 * GIB)]), Act::Add(s.into())),
            (
                at(t, &[(s, NEW, 2 * GIB), (t, NEW, 2 * GIB)]),
                Act::Reopen(s.into()),
            ),
            (
                at(s, &[(s, NEW, 2 * GIB), (t, NEW, 2 * GIB)]),
                Act::Delete(t.into()),
            ),
        ];
        for (seen, act) in steps {
            assert_eq!(next(&seen, 1, &want()), Ok(act), "{seen:?}");
        }
        // The format node took the new size when it was reopened: the guest was told by
        // the step that left the old node, so the move is done.
        let mut done = at(s, &[(s, NEW, 2 * GIB)]);
        done.nodes
            .insert("libvirt-1-format".into(), node(None, 2 * GIB));
        assert_eq!(next(&done, 1, &want()), Ok(Act::Done));
        // One that did not is grown.
        assert_eq!(
            next(&at(s, &[(s, NEW, 2 * GIB)]), 1, &want()),
            Ok(Act::Resize(2 * GIB))
        );
        // A temporary node left on another export (the volume grew again meanwhile) goes.
        assert_eq!(
            next(&at(s, &[(s, OLD, GIB), (t, OLD, GIB)]), 1, &want()),
            Ok(Act::Delete(t.into()))
        );
        // A format node reading something else is not touched.
        let e = next(&at("elsewhere", &[]), 1, &want()).expect_err("refused");
        assert!(
            e.contains("libvirt-1-format") && e.contains("elsewhere"),
            "{e}"
        );
    }

    #[test]
    fn the_export_a_node_reads_comes_from_its_file_name() {
        assert_eq!(
            export_of("nbd://10.0.0.1:10810/5b1fe0"),
            Some((10810, "5b1fe0".to_owned()))
        );
        assert_eq!(
            export_of(
                r#"json:{"driver":"nbd","server":{"type":"inet","host":"fd00::1","port":"10811"},"export":"x1"}"#
            ),
            Some((10811, "x1".to_owned()))
        );
        assert_eq!(export_of("nbd+unix:///a?socket=/s"), None);
        assert_eq!(export_of("/var/lib/x.raw"), None);
        assert_eq!(export_of("nbd://h:notaport/x"), None);
    }

    #[test]
    fn qemus_replies_are_read_into_the_disks_nodes() {
        let named = json!([
            {"node-name": "libvirt-1-format", "drv": "raw", "file": "nbd://10.0.0.1:10809/old",
             "image": {"virtual-size": 1024}},
            {"node-name": "libvirt-1-storage", "drv": "nbd", "file": "nbd://10.0.0.1:10809/old",
             "image": {"virtual-size": 1024}},
            {"node-name": "stratus-1-moving", "drv": "nbd", "file": "nbd://10.0.0.1:10810/new",
             "image": {"virtual-size": 2048}},
        ]);
        let graph = json!({
            "nodes": [
                {"id": 1, "type": "block-backend", "name": "virtio-disk2"},
                {"id": 2, "type": "block-driver", "name": "libvirt-1-format"},
                {"id": 3, "type": "block-driver", "name": "libvirt-1-storage"},
                {"id": 4, "type": "block-driver", "name": "stratus-1-moving"},
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root"},
                {"parent": 2, "child": 4, "name": "file"},
            ],
        });
        let s = seen(&named, &graph, "libvirt-1-format");
        assert_eq!(s.under_format.as_deref(), Some("stratus-1-moving"));
        assert_eq!(s.nodes["libvirt-1-format"], node(None, 1024));
        assert_eq!(
            s.nodes["stratus-1-moving"],
            node(Some((10810, "new")), 2048)
        );
    }

    #[test]
    fn commands_repeat_the_disks_options() {
        let cache = json!({"direct": true, "no-flush": false, "writeback": true});
        let add = add_command(
            "stratus-3-moving",
            "10.0.0.1",
            &want(),
            Some("objlibvirt-3-storage_tls0"),
            &cache,
        );
        assert_eq!(add["execute"], "blockdev-add");
        let a = &add["arguments"];
        assert_eq!(
            (&a["server"]["port"], &a["export"], &a["tls-creds"]),
            (
                &json!("10810"),
                &json!("new"),
                &json!("objlibvirt-3-storage_tls0")
            )
        );
        assert!(
            add_command("n", "h", &want(), None, &cache)["arguments"]
                .get("tls-creds")
                .is_none()
        );
        let node = json!({"ro": false, "cache": cache, "detect_zeroes": "off"});
        let r = reopen_command("libvirt-3-format", "stratus-3-moving", &node);
        let o = &r["arguments"]["options"][0];
        assert_eq!(
            (&o["node-name"], &o["file"], &o["read-only"], &o["driver"]),
            (
                &json!("libvirt-3-format"),
                &json!("stratus-3-moving"),
                &json!(false),
                &json!("raw")
            )
        );
    }

    #[test]
    fn replies_objects_and_the_live_xml_are_read() {
        assert_eq!(returned(r#"{"return":{},"id":"l1"}"#), Ok(json!({})));
        assert_eq!(
            returned(r#"{"error":{"class":"GenericError","desc":"Cannot grow NBD nodes"}}"#),
            Err("Cannot grow NBD nodes".to_owned())
        );
        assert!(returned("nope").is_err());
        let objects = json!([
            {"name": "objlibvirt-2-storage_tls0", "type": "child<tls-creds-x509>"},
            {"name": "objlibvirt-3-storage_tls0", "type": "child<tls-creds-x509>"},
            {"name": "libvirt-3-storage", "type": "child<secret>"},
        ]);
        assert_eq!(
            tls_object(&objects, "libvirt-3-storage").as_deref(),
            Some("objlibvirt-3-storage_tls0")
        );
        assert_eq!(tls_object(&objects, "libvirt-4-storage"), None);
        let xml = "<domain><devices>\
            <disk type='file'><source file='/a' index='2'><x/></source><backingStore/><target dev='vda'/></disk>\
            <disk type='network'><source protocol='nbd' name='old' tls='yes' index='3'><host name='10.0.0.1' port='10809'/></source>\
            <backingStore type='file'><source file='/b' index='9'/></backingStore><target dev='vdc' bus='virtio'/></disk>\
            </devices></domain>";
        assert_eq!(disk_index(xml, "vdc"), Some(3));
        assert_eq!(disk_index(xml, "vda"), Some(2));
        assert_eq!(disk_index(xml, "vdd"), None);
        assert_eq!(
            moved_path(
                std::path::Path::new("nbd+tls://10.0.0.1:10809/old"),
                &want()
            ),
            Some("nbd+tls://10.0.0.1:10810/new".into())
        );
        assert_eq!(
            moved_path(std::path::Path::new("nbd://[fd00::1]:10809/old"), &want()),
            Some("nbd://[fd00::1]:10810/new".into())
        );
    }
}
