//! A field's place in an object, kept as a chain of borrowed segments while a walk descends
//! and written out (`spec.items[0].name`) only when a message names it.

/// Where a value sits in the object being walked.
#[derive(Debug, Clone, Copy)]
pub enum FieldPath<'a> {
    /// The object itself.
    Root,
    /// A member of the map at the parent path.
    Key(&'a FieldPath<'a>, &'a str),
    /// An element of the list at the parent path.
    Index(&'a FieldPath<'a>, usize),
}

impl FieldPath<'_> {
    /// The path as Kubernetes writes it in causes: `spec.items[0].name`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Self::Root => {}
            Self::Key(parent, key) => {
                parent.write(out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Self::Index(parent, i) => {
                parent.write(out);
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FieldPath;

    #[test]
    fn renders_keys_and_indexes_as_kubernetes_field_paths() {
        let root = FieldPath::Root;
        let spec = FieldPath::Key(&root, "spec");
        let items = FieldPath::Key(&spec, "items");
        let first = FieldPath::Index(&items, 0);
        let name = FieldPath::Key(&first, "name");
        assert_eq!(name.render(), "spec.items[0].name");
        assert_eq!(root.render(), "");
        let top = FieldPath::Index(&root, 3);
        assert_eq!(top.render(), "[3]");
    }
}
