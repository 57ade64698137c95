//! The web dashboard's assets (HTML, JavaScript, CSS), built into the binary, and the headers
//! they are served with. The page talks only to the API it is served from, with the user's own
//! token, so the API's authorization is the dashboard's.

/// One file of the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    /// Its name under `/dashboard/` (`""` for the page itself).
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The `Content-Security-Policy` every dashboard response carries: scripts, styles and
/// connections only from the API server's own origin, no inline script or style, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// A script or style sheet of `assets/`, served under its own name.
macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("../assets/", $name)),
        }
    };
}

/// Every asset, the page first.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: HTML,
        body: include_bytes!("../assets/index.html"),
    },
    asset!("style.css", CSS),
    asset!("api.js", JS),
    asset!("informer.js", JS),
    asset!("views.js", JS),
    asset!("yaml.js", JS),
    asset!("forms.js", JS),
    asset!("topology.js", JS),
    asset!("app.js", JS),
];

/// The asset at `name` (the path after `/dashboard/`; `""` and `index.html` are the page).
/// Nothing else is served: no directory listing, no path outside the list.
pub fn asset(name: &str) -> Option<&'static Asset> {
    let name = if name == "index.html" { "" } else { name };
    ASSETS.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(a: &Asset) -> &'static str {
        std::str::from_utf8(a.body).expect("assets are UTF-8")
    }

    #[test]
    fn the_page_and_each_module_it_loads_are_served() {
        let page = text(asset("").expect("the page"));
        assert_eq!(asset("index.html"), asset(""));
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            assert_eq!(a.content_type, JS);
            assert!(
                page.contains(&format!("src=\"{}\"", a.name))
                    || ASSETS
                        .iter()
                        .any(|b| text(b).contains(&format!("./{}\"", a.name))),
                "{} is loaded by the page or imported by a module",
                a.name
            );
        }
        assert!(page.contains("href=\"style.css\""));
        for missing in ["nope.js", "../Cargo.toml", "/app.js", "app.js/", "APP.JS"] {
            assert_eq!(asset(missing), None, "{missing}");
        }
    }

    /// The CSP forbids inline script and style anyway; the page does not rely on the browser
    /// to refuse what it would otherwise run.
    #[test]
    fn the_page_has_no_inline_script_style_or_handler() {
        let page = text(asset("").expect("the page"));
        let lower = page.to_ascii_lowercase();
        for (i, _) in lower.match_indices("<script") {
            let tag = &lower[i..i + lower[i..].find('>').expect("a closed tag")];
            assert!(tag.contains(" src="), "a script with a source: {tag}");
            assert!(lower[i..].contains("></script>"), "an empty script element");
        }
        assert!(!lower.contains("<style"), "no style element");
        assert!(!lower.contains(" style="), "no style attribute");
        for (i, _) in lower.match_indices(" on") {
            let name: String = lower[i + 1..]
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            assert!(
                !lower[i + 1 + name.len()..].starts_with('='),
                "no event handler attribute ({name})"
            );
        }
        assert!(!lower.contains("javascript:"), "no javascript: URL");
        assert!(!lower.contains("http://") && !lower.contains("https://"));
    }

    /// Before the page's script runs (a slow link) or if it fails to load, a submitted login
    /// form is sent by the browser itself: it must carry no password, least of all in a URL.
    #[test]
    fn the_login_form_sends_no_password_without_the_script() {
        let page = text(asset("").expect("the page"));
        let start = page.find("<form id=\"login\"").expect("the login form");
        let form = &page[start..start + page[start..].find("</form>").expect("a closed form")];
        let tag = &form[..form.find('>').expect("a closed tag")];
        assert!(
            tag.contains("method=\"post\""),
            "posted, not in a query string: {tag}"
        );
        for (i, _) in form.match_indices("<input") {
            let input = &form[i..i + form[i..].find('>').expect("a closed tag")];
            assert!(
                !input.contains(" name="),
                "an unnamed input is never submitted: {input}"
            );
        }
    }

    /// API data (names, descriptions, messages) is user input: it reaches the page only as
    /// text, and the token only lives in memory.
    #[test]
    fn scripts_write_text_and_keep_the_token_in_memory() {
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let js = text(a);
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "localStorage",
                "sessionStorage",
                "document.cookie",
                "http://",
                "https://",
                "setAttribute(\"on",
                "setAttribute('on",
            ] {
                assert!(!js.contains(banned), "{} uses {banned}", a.name);
            }
        }
    }

    #[test]
    fn the_policy_allows_nothing_but_this_origin() {
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'self'",
        ] {
            assert!(CONTENT_SECURITY_POLICY.contains(directive), "{directive}");
        }
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }
}
