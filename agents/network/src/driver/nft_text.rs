//! An nft batch written in nft's own syntax (what `nft -f` reads), one command a line, for
//! the subset of objects and statements Stratus's tables use: `nft` parses it in about half
//! the time of the same batch as JSON, which matters for a node of thousands of rules.
//!
//! Every token is checked as it is written: names are identifiers (a letter, then letters,
//! digits, `_` and `-`), interface names are quoted strings without quotes, backslashes or
//! control characters, every other value is a bare token of letters, digits and `:._/-`
//! (addresses, MACs, protocol and state names), comments are digests. Anything else —
//! a statement or expression this writer does not know, a value that fails its check — is
//! [`Unsupported`], and the caller sends the batch as JSON instead, so a value can never
//! change the meaning of the text around it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use nftables::expr::{
    Expression, MetaKey, NamedExpression, Payload, PayloadBase, SetItem, Verdict,
};
use nftables::schema::{
    Chain, Element, FlushObject, NfCmd, NfListObject, NfObject, Nftables, Rule, Set, SetType,
    SetTypeValue,
};
use nftables::stmt::{NAT, Operator, Statement};
use nftables::types::NfFamily;

/// Why a batch was not written as text (the caller writes JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

fn no<T>(what: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(what.into()))
}

/// How a value is written: an interface name is a quoted string, the rest bare tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ifname,
    Bare,
}

/// The name serde gives a unit-like enum value (`NfFamily::INet` → `inet`, `MetaKey::Iifname`
/// → `iifname`): the words of nft's syntax, as the `nftables` crate spells them for JSON.
fn word<T: serde::Serialize>(v: &T) -> Result<String, Unsupported> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) if is_word(&s) => Ok(s),
        _ => no("a keyword the crate does not write as a word"),
    }
}

fn is_word(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A table, chain or set name.
fn ident(s: &str) -> Result<&str, Unsupported> {
    let mut chars = s.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.len() <= 64;
    if ok { Ok(s) } else { no(format!("name {s:?}")) }
}

/// A bare value: an address, prefix, MAC, number or keyword.
fn bare(s: &str) -> Result<&str, Unsupported> {
    let mut chars = s.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '_' | '/' | '-'))
        && s.len() <= 64;
    if ok {
        Ok(s)
    } else {
        no(format!("value {s:?}"))
    }
}

/// A quoted interface name.
fn quoted(s: &str) -> Result<String, Unsupported> {
    let ok = !s.is_empty()
        && s.len() <= 16
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
    if ok {
        Ok(format!("\"{s}\""))
    } else {
        no(format!("interface name {s:?}"))
    }
}

fn family(f: NfFamily) -> Result<String, Unsupported> {
    word(&f)
}

/// The set types of the sets a batch may name, by family and name.
type SetTypes = BTreeMap<(String, String), Vec<Kind>>;

fn kinds_of(t: &SetTypeValue<'_>) -> Vec<Kind> {
    let kind = |t: &SetType| match t {
        SetType::Ifname => Kind::Ifname,
        _ => Kind::Bare,
    };
    match t {
        SetTypeValue::Single(t) => vec![kind(t)],
        SetTypeValue::Concatenated(ts) => ts.iter().map(kind).collect(),
    }
}

/// The batch as `nft -f` text, the types of the sets it adds elements to taken from `sets`
/// (and from the sets it makes).
///
/// # Errors
/// [`Unsupported`]: something in it this writer does not write; send it as JSON.
pub(super) fn write(
    batch: &Nftables<'static>,
    sets: &[Set<'static>],
) -> Result<String, Unsupported> {
    let mut types = SetTypes::new();
    let objects = batch.objects.iter();
    let made = objects.filter_map(|o| match o {
        NfObject::CmdObject(NfCmd::Add(NfListObject::Set(s))) => Some(&**s),
        _ => None,
    });
    for s in sets.iter().chain(made) {
        types.insert(
            (family(s.family)?, s.name.to_string()),
            kinds_of(&s.set_type),
        );
    }
    let mut out = String::new();
    for obj in batch.objects.iter() {
        let line = match obj {
            NfObject::CmdObject(NfCmd::Add(o)) => format!("add {}", object(o, &types)?),
            NfObject::CmdObject(NfCmd::Delete(o)) => format!("delete {}", reference(o, &types)?),
            NfObject::CmdObject(NfCmd::Flush(FlushObject::Chain(c))) => {
                format!("flush chain {}", chain_ref(c)?)
            }
            _ => return no("a command other than add, delete and flush chain"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn chain_ref(c: &Chain<'_>) -> Result<String, Unsupported> {
    Ok(format!(
        "{} {} {}",
        family(c.family)?,
        ident(&c.table)?,
        ident(&c.name)?
    ))
}

/// An object named for `delete`.
fn reference(o: &NfListObject<'static>, types: &SetTypes) -> Result<String, Unsupported> {
    Ok(match o {
        NfListObject::Table(t) => format!("table {} {}", family(t.family)?, ident(&t.name)?),
        NfListObject::Chain(c) => format!("chain {}", chain_ref(c)?),
        NfListObject::Set(s) => format!(
            "set {} {} {}",
            family(s.family)?,
            ident(&s.table)?,
            ident(&s.name)?
        ),
        NfListObject::Element(e) => element(e, types)?,
        _ => return no("a deletion of another kind of object"),
    })
}

fn element(e: &Element<'static>, types: &SetTypes) -> Result<String, Unsupported> {
    let f = family(e.family)?;
    let Some(kinds) = types.get(&(f.clone(), e.name.to_string())) else {
        return no(format!("elements of set {} of unknown type", e.name));
    };
    let items = e
        .elem
        .iter()
        .map(|x| value(x, kinds))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!(
        "element {f} {} {} {{ {} }}",
        ident(&e.table)?,
        ident(&e.name)?,
        items.join(", ")
    ))
}

/// An object made by `add`.
fn object(o: &NfListObject<'static>, types: &SetTypes) -> Result<String, Unsupported> {
    Ok(match o {
        NfListObject::Table(t) if t.handle.is_none() => {
            format!("table {} {}", family(t.family)?, ident(&t.name)?)
        }
        NfListObject::Chain(c) => chain(c)?,
        NfListObject::Set(s) => set(s)?,
        NfListObject::Element(e) => element(e, types)?,
        NfListObject::Rule(r) => rule(r)?,
        _ => return no("an object other than a table, chain, set, element or rule"),
    })
}

fn chain(c: &Chain<'static>) -> Result<String, Unsupported> {
    let name = chain_ref(c)?;
    if c.handle.is_some() || c.newname.is_some() || c.dev.is_some() {
        return no("a chain with a handle, new name or device");
    }
    match (&c._type, &c.hook, c.prio, &c.policy) {
        (None, None, None, None) => Ok(format!("chain {name}")),
        (Some(t), Some(h), Some(p), policy) => {
            let policy = match policy {
                Some(p) => format!(" policy {};", word(p)?),
                None => String::new(),
            };
            Ok(format!(
                "chain {name} {{ type {} hook {} priority {p};{policy} }}",
                word(t)?,
                word(h)?
            ))
        }
        _ => no("a chain with part of a base chain's type, hook and priority"),
    }
}

fn set(s: &Set<'static>) -> Result<String, Unsupported> {
    let plain = s.flags.is_none()
        && s.timeout.is_none()
        && s.gc_interval.is_none()
        && s.size.is_none()
        && s.policy.is_none()
        && s.comment.is_none()
        && s.handle.is_none();
    if !plain {
        return no("a set with flags, timeouts, a size, a policy or a comment");
    }
    let (type_words, kinds) = match &s.set_type {
        SetTypeValue::Single(t) => (word(t)?, kinds_of(&s.set_type)),
        SetTypeValue::Concatenated(ts) => (
            ts.iter()
                .map(word)
                .collect::<Result<Vec<_>, _>>()?
                .join(" . "),
            kinds_of(&s.set_type),
        ),
    };
    let mut text = format!(
        "set {} {} {} {{ type {type_words};",
        family(s.family)?,
        ident(&s.table)?,
        ident(&s.name)?
    );
    if let Some(elems) = &s.elem
        && !elems.is_empty()
    {
        let items = elems
            .iter()
            .map(|x| value(x, &kinds))
            .collect::<Result<Vec<_>, _>>()?;
        let _ = write!(text, " elements = {{ {} }};", items.join(", "));
    }
    text.push_str(" }");
    Ok(text)
}

fn rule(r: &Rule<'static>) -> Result<String, Unsupported> {
    if r.handle.is_some() || r.index.is_some() {
        return no("a rule placed by handle or index");
    }
    let mut text = format!(
        "rule {} {} {}",
        family(r.family)?,
        ident(&r.table)?,
        ident(&r.chain)?
    );
    for st in r.expr.iter() {
        text.push(' ');
        text.push_str(&statement(st)?);
    }
    if let Some(c) = &r.comment {
        if !(c.chars().all(|c| c.is_ascii_alphanumeric()) && c.len() <= 64) {
            return no(format!("comment {c:?}"));
        }
        let _ = write!(text, " comment \"{c}\"");
    }
    Ok(text)
}

fn statement(st: &Statement<'static>) -> Result<String, Unsupported> {
    Ok(match st {
        Statement::Accept(None) => "accept".into(),
        Statement::Drop(None) => "drop".into(),
        Statement::Return(None) => "return".into(),
        Statement::Jump(t) => format!("jump {}", ident(&t.target)?),
        Statement::Notrack => "notrack".into(),
        Statement::Match(m) => {
            let (left, kinds) = selector(&m.left)?;
            let right = value(&m.right, &kinds)?;
            match m.op {
                // `in` of a list is the flags match (`ct state established,related`).
                Operator::EQ | Operator::IN => format!("{left} {right}"),
                Operator::NEQ => format!("{left} != {right}"),
                _ => return no("a match operator other than ==, != and in"),
            }
        }
        Statement::Mangle(m) => {
            let (key, kinds) = selector(&m.key)?;
            match &m.value {
                // `ct zone set iifname map { "br-a" : 7, ... }`: the value looked up by a key.
                Expression::Named(NamedExpression::Map(map)) => {
                    let (by, by_kinds) = selector(&map.key)?;
                    format!(
                        "{key} set {by} map {}",
                        mapping(&map.data, &by_kinds, &kinds)?
                    )
                }
                v => format!("{key} set {}", value(v, &kinds)?),
            }
        }
        Statement::VerdictMap(v) => {
            let (key, kinds) = selector(&v.key)?;
            format!("{key} vmap {}", mapping(&v.data, &kinds, &[])?)
        }
        Statement::SNAT(Some(n)) => format!("snat to {}", nat(n)?),
        Statement::DNAT(Some(n)) => format!("dnat to {}", nat(n)?),
        _ => return no("a statement this writer does not know"),
    })
}

fn nat(n: &NAT<'static>) -> Result<String, Unsupported> {
    match (n, &n.addr) {
        (
            NAT {
                family: None,
                port: None,
                flags: None,
                ..
            },
            Some(a),
        ) => value(a, &[Kind::Bare]),
        _ => no("a NAT statement with a family, port or flags"),
    }
}

fn verdict(v: &Verdict<'static>) -> Result<String, Unsupported> {
    Ok(match v {
        Verdict::Accept => "accept".into(),
        Verdict::Drop => "drop".into(),
        Verdict::Return => "return".into(),
        Verdict::Jump(t) => format!("jump {}", ident(&t.target)?),
        _ => return no("a verdict other than accept, drop, return and jump"),
    })
}

/// An anonymous map from keys written as `keys` says to values written as `values` says
/// (none: verdicts).
fn mapping(
    data: &Expression<'static>,
    keys: &[Kind],
    values: &[Kind],
) -> Result<String, Unsupported> {
    let Expression::Named(NamedExpression::Set(items)) = data else {
        return no("a map that is not an anonymous map");
    };
    let items = items
        .iter()
        .map(|i| match i {
            SetItem::Mapping(k, v) => Ok(format!("{} : {}", value(k, keys)?, value(v, values)?)),
            _ => no("a map item that is not a key and a value"),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!("{{ {} }}", items.join(", ")))
}

/// A match's left side (or a map's key), with how each of its values is written.
fn selector(e: &Expression<'static>) -> Result<(String, Vec<Kind>), Unsupported> {
    match e {
        Expression::Named(NamedExpression::Meta(m)) => {
            let kind = match m.key {
                MetaKey::Iifname | MetaKey::Oifname => Kind::Ifname,
                _ => Kind::Bare,
            };
            Ok((format!("meta {}", word(&m.key)?), vec![kind]))
        }
        Expression::Named(NamedExpression::CT(ct)) if ct.family.is_none() && ct.dir.is_none() => {
            if !is_word(&ct.key) {
                return no(format!("ct key {:?}", ct.key));
            }
            Ok((format!("ct {}", ct.key), vec![Kind::Bare]))
        }
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(p))) => {
            let words = std::iter::once(p.protocol.as_ref()).chain(p.field.split(' '));
            for w in words.clone() {
                if !is_word(w) {
                    return no(format!("payload {} {}", p.protocol, p.field));
                }
            }
            Ok((words.collect::<Vec<_>>().join(" "), vec![Kind::Bare]))
        }
        Expression::Named(NamedExpression::Payload(Payload::PayloadRaw(p))) => {
            let base = match p.base {
                PayloadBase::LL => "ll",
                PayloadBase::NH => "nh",
                PayloadBase::TH => "th",
                PayloadBase::IH => "ih",
            };
            Ok((format!("@{base},{},{}", p.offset, p.len), vec![Kind::Bare]))
        }
        Expression::Named(NamedExpression::Concat(parts)) => {
            let mut texts = Vec::new();
            let mut kinds = Vec::new();
            for part in parts {
                let (t, k) = selector(part)?;
                if k.len() != 1 {
                    return no("a concatenation inside a concatenation");
                }
                texts.push(t);
                kinds.extend(k);
            }
            Ok((texts.join(" . "), kinds))
        }
        _ => no("a selector this writer does not know"),
    }
}

/// A value (or a set reference, a prefix, a range, a list of flags, an anonymous set, a
/// concatenation) of what `kinds` says.
fn value(e: &Expression<'static>, kinds: &[Kind]) -> Result<String, Unsupported> {
    let one = |s: &str| -> Result<String, Unsupported> {
        match kinds {
            [Kind::Ifname] => quoted(s),
            [Kind::Bare] => Ok(bare(s)?.to_owned()),
            _ => no("a value where a concatenation belongs"),
        }
    };
    match e {
        Expression::String(s) => match s.strip_prefix('@') {
            Some(set) => Ok(format!("@{}", ident(set)?)),
            None => one(s),
        },
        Expression::Number(n) if kinds == [Kind::Bare] => Ok(n.to_string()),
        // A verdict map's values (no kinds: nothing else is written there).
        Expression::Verdict(v) if kinds.is_empty() => verdict(v),
        Expression::Range(r) => Ok(format!(
            "{}-{}",
            value(&r.range[0], kinds)?,
            value(&r.range[1], kinds)?
        )),
        Expression::Named(NamedExpression::Prefix(p)) if kinds == [Kind::Bare] => {
            Ok(format!("{}/{}", value(&p.addr, kinds)?, p.len))
        }
        Expression::List(items) => Ok(items
            .iter()
            .map(|i| value(i, kinds))
            .collect::<Result<Vec<_>, _>>()?
            .join(",")),
        Expression::Named(NamedExpression::Set(items)) => {
            let items = items
                .iter()
                .map(|i| match i {
                    SetItem::Element(x) => value(x, kinds),
                    _ => no("a mapping in an anonymous set"),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(format!("{{ {} }}", items.join(", ")))
        }
        Expression::Named(NamedExpression::Concat(parts)) if parts.len() == kinds.len() => {
            let parts = parts
                .iter()
                .zip(kinds)
                .map(|(p, k)| value(p, std::slice::from_ref(k)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(parts.join(" . "))
        }
        _ => no("a value this writer does not know"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::conformance::sample_ruleset;

    #[test]
    fn the_sample_ruleset_is_written_as_text_line_by_line() {
        let rs = sample_ruleset();
        let text = write(&rs.render().expect("render"), &[]).expect("text");
        assert!(text.starts_with("add table inet stratus\ndelete table inet stratus\n"));
        assert!(text.contains(
            "add chain inet stratus forward { type filter hook forward priority 0; policy accept; }\n"
        ));
        assert!(
            text.contains(
                "ct zone set meta iifname map { \"br-c1\" : 1, \"br-c2\" : 2 } accept comment \""
            ),
            "{text}"
        );
        assert!(text.contains("ct state established,related accept"));
        assert!(text.contains(
            "meta iifname . ether saddr vmap { \"br-c1\" . 02:00:00:00:00:01 : jump p-one-out }"
        ));
        assert!(text.contains("ip saddr @g-one meta l4proto udp udp dport 1000-2000 return"));
        assert!(text.contains(
            "add set bridge stratus port-mac { type ifname . ether_addr; elements = { \"ve-c1\" . 02:00:00:00:00:01 }; }"
        ));
        // One command a line, as nft 1.0.6 wants.
        assert_eq!(
            text.lines().count(),
            rs.render().expect("render").objects.len()
        );
    }

    #[test]
    fn a_value_that_could_change_the_text_around_it_sends_the_batch_as_json() {
        use nftables::expr::Meta;
        use nftables::stmt::Match;
        use std::borrow::Cow;
        let hostile = |right: &str, key: MetaKey| Rule {
            family: NfFamily::INet,
            table: "stratus".into(),
            chain: "forward".into(),
            expr: Cow::Owned(vec![Statement::Match(Match {
                left: Expression::Named(NamedExpression::Meta(Meta { key })),
                right: Expression::String(Cow::Owned(right.to_owned())),
                op: Operator::EQ,
            })]),
            handle: None,
            index: None,
            comment: None,
        };
        for (right, key) in [
            ("x\" accept; flush ruleset; \"", MetaKey::Iifname),
            ("a\\b", MetaKey::Oifname),
            ("tcp; flush ruleset", MetaKey::L4proto),
            ("tcp accept", MetaKey::L4proto),
            ("@g one", MetaKey::L4proto),
            ("", MetaKey::L4proto),
        ] {
            let batch = Nftables {
                objects: Cow::Owned(vec![NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(
                    hostile(right, key),
                )))]),
            };
            assert!(write(&batch, &[]).is_err(), "{right:?} was written as text");
        }
    }
}
