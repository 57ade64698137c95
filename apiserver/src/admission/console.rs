//! A Server's serial console log, kept beside it (`servers/NAME/console`): its key, deleted in
//! the same transaction as the Server, so no console outlives its server or reaches a new
//! server of the same name.

use serde_json::Value;

use crate::admission::Admission;

/// The most console bytes kept per Server: the last 64 KiB of its log.
pub const MAX_BYTES: usize = 64 * 1024;

/// Where the console log of Server `name` in project `namespace` is kept (outside every served
/// resource's keys).
pub fn key(prefix: &str, namespace: &str, name: &str) -> String {
    format!("{prefix}/_system/console/{namespace}/{name}")
}

/// Deletes a Server's console log with the Server.
pub struct Console;

impl Admission for Console {
    fn attached_keys(&self, prefix: &str, obj: &Value) -> Vec<String> {
        let field = |f: &str| {
            obj.pointer(&format!("/metadata/{f}"))
                .and_then(Value::as_str)
        };
        match (field("namespace"), field("name")) {
            (Some(ns), Some(name)) => vec![key(prefix, ns, name)],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_servers_console_goes_with_it() {
        let server = json!({"metadata": {"namespace": "demo", "name": "web-1"}});
        assert_eq!(
            Console.attached_keys("/r", &server),
            vec!["/r/_system/console/demo/web-1".to_string()]
        );
        assert!(
            Console
                .attached_keys("/r", &json!({"metadata": {"name": "x"}}))
                .is_empty()
        );
    }
}
