//! The suites every implementation of a driver trait passes, so that a fake used in a test
//! behaves as the real thing does: [`domain_driver`] for [`DomainDriver`] (run against
//! [`FakeDomains`](super::fake::FakeDomains), libvirt's `test:///` driver and real QEMU) and
//! [`disks`] for [`Disks`] (run against [`MemoryDisks`](super::fake::MemoryDisks) and
//! [`HostDisks`](super::disk::HostDisks)). They panic on the first guarantee broken.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ConfigDrive;
use super::{
    DiskFormat, DiskSpec, Disks, DomainDriver, DomainSpec, DomainState, DriverError, InterfaceSpec,
    Owner, VolumeDisk,
};

/// A domain spec for the suites: 1 vCPU, 128 MiB, a root disk and a config drive in `dir`
/// (files the caller makes when its driver opens them).
pub fn spec(name: &str, uuid: &str, dir: &Path) -> DomainSpec {
    DomainSpec {
        name: name.to_owned(),
        uuid: uuid.to_owned(),
        vcpus: 1,
        memory_mib: 128,
        kernel: None,
        disks: vec![
            DiskSpec {
                path: dir.join("root.qcow2"),
                format: DiskFormat::Qcow2,
                readonly: false,
                backing: None,
            },
            DiskSpec {
                path: dir.join("config.iso"),
                format: DiskFormat::Raw,
                readonly: true,
                backing: None,
            },
        ],
        console_log: dir.join("console.log"),
        interfaces: vec![InterfaceSpec {
            mac: "fa:16:3e:12:34:56".into(),
            tap: "tapc0nf0rm4nce".into(),
            mtu: Some(1450),
        }],
        owner: Owner {
            namespace: "conformance".into(),
            name: name.trim_start_matches("stratus-").into(),
            uid: uuid.to_owned(),
        },
    }
}

fn state(d: &dyn DomainDriver, name: &str) -> DomainState {
    d.lookup(name)
        .expect("lookup")
        .unwrap_or_else(|| panic!("{name} is not defined"))
        .state
}

/// Checks every guarantee of [`DomainDriver`] on one fresh domain built by `spec` (its name
/// starts with `stratus-` and is used by nothing else).
pub fn domain_driver(d: &dyn DomainDriver, spec: &DomainSpec) {
    let name = spec.name.as_str();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    d.subscribe(tx).expect("subscribe");

    let mut foreign = spec.clone();
    foreign.name = format!("other-{}", spec.uuid);
    assert!(
        matches!(d.define(&foreign), Err(DriverError::InvalidSpec(_))),
        "a name without the stratus- prefix is refused"
    );

    // An interface the hypervisor would be handed unchecked is refused, and nothing defined.
    let bad_nics = [
        ("tap; rm -rf /", "fa:16:3e:12:34:56"),
        ("tap-name-too-long", "fa:16:3e:12:34:56"),
        ("tapok", "fa:16:3e:12:34"),
        ("tapok", "01:00:5e:00:00:01"),
    ];
    for (tap, mac) in bad_nics {
        let mut bad = spec.clone();
        bad.interfaces.push(InterfaceSpec {
            mac: mac.into(),
            tap: tap.into(),
            mtu: None,
        });
        assert!(
            matches!(d.define(&bad), Err(DriverError::InvalidSpec(_))),
            "interface {tap:?} {mac:?} is refused"
        );
    }
    if let Some(first) = spec.interfaces.first() {
        let mut twice = spec.clone();
        twice.interfaces.push(first.clone());
        assert!(
            matches!(d.define(&twice), Err(DriverError::InvalidSpec(_))),
            "one tap device twice is refused"
        );
    }

    // Missing: lookup says so, undefine has nothing to do, the other verbs refuse.
    assert_eq!(d.lookup(name).expect("lookup"), None);
    type Verb = fn(&dyn DomainDriver, &str) -> Result<(), DriverError>;
    let verbs: [(&str, Verb); 5] = [
        ("start", |d, n| d.start(n)),
        ("shutdown", |d, n| d.shutdown(n)),
        ("destroy", |d, n| d.destroy(n)),
        ("reboot", |d, n| d.reboot(n)),
        ("reset", |d, n| d.reset(n)),
    ];
    for (verb, call) in verbs {
        assert!(
            matches!(call(d, name), Err(DriverError::NoDomain(ref n)) if n == name),
            "{verb} of a missing domain"
        );
    }
    d.undefine(name)
        .expect("undefine of a missing domain is a no-op");

    // Defined: off, with its uuid and owner; defining again replaces it.
    d.define(spec).expect("define");
    let info = d.lookup(name).expect("lookup").expect("defined");
    assert_eq!(
        (info.name.as_str(), info.uuid.as_str(), info.state),
        (name, spec.uuid.as_str(), DomainState::Shutoff)
    );
    assert_eq!(info.owner.as_ref(), Some(&spec.owner));
    // Its root disk as defined: what a start compares with the boot volume's path.
    assert_eq!(
        d.defined_root(name).expect("the defined root disk"),
        spec.disks.first().map(|r| r.path.clone())
    );
    // The same, as a volume's disk is told: at vda, no size while off.
    let root = d.root_volume(name).expect("the root disk");
    assert_eq!(
        root.as_ref()
            .map(|r| (r.target.as_str(), r.path.as_path(), r.capacity)),
        spec.disks
            .first()
            .map(|r| (super::ROOT_DISK, r.path.as_path(), None))
    );
    d.define(spec).expect("redefine while off");

    d.start(name).expect("start");
    assert_eq!(state(d, name), DomainState::Running);
    d.start(name).expect("start of a running domain is a no-op");
    let mut bigger = spec.clone();
    bigger.memory_mib *= 2;
    d.define(&bigger).expect("redefine while running");

    let listed = d.list().expect("list");
    let ours = listed.iter().find(|i| i.name == name).expect("listed");
    assert_eq!(ours.owner.as_ref(), Some(&spec.owner));
    assert_eq!(ours.state, DomainState::Running);
    assert!(listed.iter().all(|i| i.name.starts_with("stratus-")));

    d.reboot(name).expect("reboot of a running domain");
    d.reset(name).expect("reset of a running domain");
    assert!(
        matches!(d.undefine(name), Err(DriverError::Active(ref n)) if n == name),
        "undefine of a running domain"
    );

    // A shutdown is a request the guest may ignore; destroy stops it whatever it does.
    d.shutdown(name).expect("shutdown");
    d.destroy(name).expect("destroy");
    assert_eq!(state(d, name), DomainState::Shutoff);
    d.destroy(name)
        .expect("destroy of a stopped domain is a no-op");
    d.shutdown(name)
        .expect("shutdown of a stopped domain is a no-op");
    assert!(matches!(d.reboot(name), Err(DriverError::NotRunning(ref n)) if n == name));
    assert!(matches!(d.reset(name), Err(DriverError::NotRunning(_))));

    d.undefine(name).expect("undefine");
    assert_eq!(d.lookup(name).expect("lookup"), None);
    d.undefine(name).expect("undefine again is a no-op");
    assert!(!d.list().expect("list").iter().any(|i| i.name == name));

    // Defined, started, stopped, undefined: each was announced, naming the domain.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut announced = 0;
    while announced < 4 && Instant::now() < deadline {
        match events.try_recv() {
            Ok(n) if n == name => announced += 1,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(
        announced >= 4,
        "only {announced} lifecycle events named {name}"
    );
}

/// Checks the volume verbs of [`DomainDriver`] on a fresh, stopped domain built by `spec`:
/// a volume attached to the definition is listed (no size while the domain is off), attaching
/// it again and detaching a target with no disk are `Ok(())`, a detached volume is gone,
/// resizing on a stopped domain is [`DriverError::NotRunning`], and every verb on a missing
/// domain is [`DriverError::NoDomain`]. `volume` is the path of the volume's data (a file the
/// caller makes when its driver opens it). The domain is undefined at the end.
pub fn volumes(d: &dyn DomainDriver, spec: &DomainSpec, volume: &Path) {
    d.define(spec).expect("define");
    let name = spec.name.as_str();
    assert!(
        d.volumes(name).expect("volumes").is_empty(),
        "no volume yet"
    );
    let disk = VolumeDisk {
        path: volume.to_path_buf(),
        target: "vdc".into(),
        serial: "0f9e2c1a77b44c1d9a34".into(),
        shareable: false,
    };
    d.attach_volume(name, &disk).expect("attach");
    d.attach_volume(name, &disk).expect("attach again");
    let listed = d.volumes(name).expect("volumes");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].target.as_str(), listed[0].path.as_path()),
        ("vdc", volume)
    );
    assert_eq!(listed[0].serial.as_deref(), Some(disk.serial.as_str()));
    assert_eq!(listed[0].capacity, None, "no size while off");
    assert!(matches!(
        d.resize_volume(name, "vdc", 2 << 30),
        Err(DriverError::NotRunning(_))
    ));
    d.detach_volume(name, "vdc").expect("detach");
    d.detach_volume(name, "vdc").expect("detach again");
    assert!(d.volumes(name).expect("volumes").is_empty(), "detached");
    d.undefine(name).expect("undefine");
    assert!(matches!(d.volumes(name), Err(DriverError::NoDomain(_))));
    assert!(matches!(
        d.attach_volume(name, &disk),
        Err(DriverError::NoDomain(_))
    ));
    assert!(matches!(
        d.detach_volume(name, "vdc"),
        Err(DriverError::NoDomain(_))
    ));
}

/// Checks the interface verbs of [`DomainDriver`] on a fresh, stopped domain built by `spec`:
/// the interfaces it is defined with are listed (MAC, tap, MTU); one attached is listed after
/// them, attaching it again (its MAC in another case too) adds nothing; an interface that
/// fails [`InterfaceSpec::check`] is refused and nothing attached; a detached one is gone
/// (named by its MAC in any case), detaching it again is `Ok(())`; every verb on a missing
/// domain is [`DriverError::NoDomain`]. The domain is undefined at the end.
pub fn interfaces(d: &dyn DomainDriver, spec: &DomainSpec) {
    d.define(spec).expect("define");
    let name = spec.name.as_str();
    let listed = d.interfaces(name).expect("interfaces");
    assert_eq!(listed.len(), spec.interfaces.len(), "{listed:?}");
    for (got, want) in listed.iter().zip(&spec.interfaces) {
        assert!(got.is(want) && got.mtu == want.mtu, "{got:?} is {want:?}");
    }
    let nic = InterfaceSpec {
        mac: "fa:16:3e:ab:cd:ef".into(),
        tap: "taphotplug01".into(),
        mtu: Some(1400),
    };
    d.attach_interface(name, &nic).expect("attach");
    d.attach_interface(name, &nic).expect("attach again");
    let upper = InterfaceSpec {
        mac: nic.mac.to_ascii_uppercase(),
        ..nic.clone()
    };
    d.attach_interface(name, &upper)
        .expect("attach again, the MAC in capitals");
    let listed = d.interfaces(name).expect("interfaces");
    assert_eq!(listed.len(), spec.interfaces.len() + 1, "{listed:?}");
    assert!(
        listed
            .last()
            .is_some_and(|i| i.is(&nic) && i.mtu == nic.mtu),
        "{listed:?}"
    );
    for (tap, mac) in [
        ("tap; rm -rf /", "fa:16:3e:00:00:09"),
        ("tapok", "01:00:5e:00:00:01"),
    ] {
        let bad = InterfaceSpec {
            mac: mac.into(),
            tap: tap.into(),
            mtu: None,
        };
        assert!(
            matches!(
                d.attach_interface(name, &bad),
                Err(DriverError::InvalidSpec(_))
            ),
            "interface {tap:?} {mac:?} is refused"
        );
    }
    assert_eq!(d.interfaces(name).expect("interfaces"), listed);
    d.detach_interface(name, &nic.mac.to_ascii_uppercase())
        .expect("detach");
    d.detach_interface(name, &nic.mac).expect("detach again");
    let left = d.interfaces(name).expect("interfaces");
    assert_eq!(left.len(), spec.interfaces.len(), "detached: {left:?}");
    assert!(!left.iter().any(|i| i.mac == nic.mac));
    d.undefine(name).expect("undefine");
    assert!(matches!(d.interfaces(name), Err(DriverError::NoDomain(_))));
    assert!(matches!(
        d.attach_interface(name, &nic),
        Err(DriverError::NoDomain(_))
    ));
    assert!(matches!(
        d.detach_interface(name, &nic.mac),
        Err(DriverError::NoDomain(_))
    ));
}

/// Checks every guarantee of [`Disks`] in `dir` (empty, writable), over the image `base`.
pub fn disks(d: &dyn Disks, base: &Path, base_format: DiskFormat, dir: &Path) {
    let guest = dir.join("guest");
    let root = guest.join("root.qcow2");
    let config = guest.join("config.iso");
    let gib = |p: &Path| {
        d.inspect(p)
            .expect("inspect")
            .unwrap_or_else(|| panic!("{} is missing", p.display()))
            .virtual_size
            >> 30
    };
    assert_eq!(d.inspect(&root).expect("inspect"), None);

    d.root_disk(base, base_format, &root, 1, false)
        .expect("root disk in a directory that does not exist yet");
    let info = d.inspect(&root).expect("inspect").expect("made");
    assert_eq!(info.virtual_size, 1 << 30);
    let backing = info.backing.expect("an overlay names its base");
    assert_eq!(
        std::fs::canonicalize(&backing).unwrap_or(backing),
        std::fs::canonicalize(base).unwrap_or_else(|_| base.to_owned())
    );

    d.root_disk(base, base_format, &root, 2, false)
        .expect("grow");
    assert_eq!(gib(&root), 2);
    d.root_disk(base, base_format, &root, 1, false)
        .expect("a smaller size is not an error");
    assert_eq!(gib(&root), 2, "a root disk never shrinks");
    d.root_disk(base, base_format, &root, 1, true)
        .expect("fresh");
    assert_eq!(gib(&root), 1, "a fresh root disk is a new overlay");

    let keys = ["ssh-ed25519 AAAA conformance".to_string()];
    let drive = |id: &'static str| ConfigDrive {
        instance_id: id,
        hostname: "conformance",
        public_keys: &keys,
        user_data: Some(b"#cloud-config\n{}\n"),
        network_config: None,
    };
    d.config_drive(&config, &drive("one"))
        .expect("config drive");
    assert!(d.inspect(&config).expect("inspect").is_some());
    d.config_drive(&config, &drive("two"))
        .expect("a config drive replaces the one before");

    d.remove_dir(&guest).expect("remove");
    assert_eq!(d.inspect(&root).expect("inspect"), None);
    assert_eq!(d.inspect(&config).expect("inspect"), None);
    d.remove_dir(&guest)
        .expect("remove of a missing directory is a no-op");
}

/// A raw base image of `mib` MiB at `dir/base.img`, for [`disks`] on the host.
pub fn raw_base(dir: &Path, mib: u64) -> PathBuf {
    let base = dir.join("base.img");
    let f = std::fs::File::create(&base).expect("create base image");
    f.set_len(mib << 20).expect("size base image");
    base
}
