//! The controllers run cluster-wide, on machines that are not hypervisors: nothing they link
//! may pull in libvirt (nor the node agents that use it).

#[test]
fn the_controllers_link_no_libvirt_and_no_agent() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal,build",
            "--prefix",
            "none",
        ])
        .args(["-p", "stratus-controllers"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"stratus-runtime"),
        "the tree lists no stratus-runtime: {tree}"
    );
    for forbidden in ["virt", "virt-sys", "stratus-agents", "quick-xml"] {
        assert!(
            !crates.contains(&forbidden),
            "stratus-controllers depends on {forbidden}"
        );
    }
}
