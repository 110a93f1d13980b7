//! Reading Nomad job files: hcl-rs structure helpers, and rendering a template's `{{ }}`
//! expressions from an explicit table (no template engine).

use hcl::{Block, Body, Expression};

use crate::read;

pub(crate) fn parse_hcl(rel: &str) -> Body {
    hcl::parse(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid HCL: {e}"))
}

/// The single `job "<name>"` block of a job file.
pub(crate) fn job(rel: &str) -> Block {
    let body = parse_hcl(rel);
    let jobs: Vec<&Block> = body.blocks().filter(|b| b.identifier.as_str() == "job").collect();
    assert_eq!(jobs.len(), 1, "{rel}: expected exactly one job block");
    jobs[0].clone()
}

pub(crate) fn blocks<'a>(body: &'a Body, ident: &str) -> Vec<&'a Block> {
    body.blocks().filter(|b| b.identifier.as_str() == ident).collect()
}

pub(crate) fn one<'a>(body: &'a Body, ident: &str) -> &'a Block {
    let found = blocks(body, ident);
    assert_eq!(found.len(), 1, "expected exactly one `{ident}` block, found {}", found.len());
    found[0]
}

pub(crate) fn label(block: &Block) -> &str {
    block.labels.first().map(|l| l.as_str()).unwrap_or("")
}

pub(crate) fn labeled<'a>(body: &'a Body, ident: &str, name: &str) -> &'a Block {
    blocks(body, ident)
        .into_iter()
        .find(|b| label(b) == name)
        .unwrap_or_else(|| panic!("no `{ident} \"{name}\"` block"))
}

pub(crate) fn attr<'a>(body: &'a Body, key: &str) -> Option<&'a Expression> {
    body.attributes().find(|a| a.key.as_str() == key).map(|a| &a.expr)
}

/// A string or template attribute as written (templates keep their `${..}` and `{{..}}` text).
pub(crate) fn expr_text(e: &Expression) -> Option<String> {
    match e {
        Expression::String(s) => Some(s.clone()),
        Expression::TemplateExpr(t) => Some(t.to_string()),
        _ => None,
    }
}

pub(crate) fn text(body: &Body, key: &str) -> String {
    attr(body, key).and_then(expr_text).unwrap_or_else(|| panic!("attribute `{key}` is missing or not a string"))
}

pub(crate) fn number(body: &Body, key: &str) -> u64 {
    match attr(body, key) {
        Some(Expression::Number(n)) => n.as_u64().unwrap_or_else(|| panic!("`{key}` is not a whole number")),
        other => panic!("attribute `{key}` is not a number: {other:?}"),
    }
}

pub(crate) fn boolean(body: &Body, key: &str) -> bool {
    match attr(body, key) {
        Some(Expression::Bool(b)) => *b,
        other => panic!("attribute `{key}` is not a bool: {other:?}"),
    }
}

pub(crate) fn string_list(body: &Body, key: &str) -> Vec<String> {
    match attr(body, key) {
        Some(Expression::Array(items)) => {
            items.iter().map(|e| expr_text(e).unwrap_or_else(|| panic!("`{key}` holds a non-string: {e:?}"))).collect()
        }
        other => panic!("attribute `{key}` is not a list: {other:?}"),
    }
}

/// `(attribute, operator, value)` of every constraint block directly in `body`.
pub(crate) fn constraints(body: &Body) -> Vec<(String, String, String)> {
    blocks(body, "constraint")
        .into_iter()
        .map(|c| {
            let get = |k: &str| attr(&c.body, k).and_then(expr_text).unwrap_or_default();
            let op = get("operator");
            (get("attribute"), if op.is_empty() { "=".to_owned() } else { op }, get("value"))
        })
        .collect()
}

/// The value of a `port "<name>" { static = N }` block of a group's network.
pub(crate) fn static_port(group: &Block, name: &str) -> u64 {
    let network = one(&group.body, "network");
    number(&labeled(&network.body, "port", name).body, "static")
}

/// The task's template whose destination is `dest`.
pub(crate) fn template<'a>(task: &'a Block, dest: &str) -> &'a Block {
    blocks(&task.body, "template")
        .into_iter()
        .find(|t| attr(&t.body, "destination").and_then(expr_text).as_deref() == Some(dest))
        .unwrap_or_else(|| panic!("task `{}` has no template with destination {dest}", label(task)))
}

/// Every `{{ ... }}` expression in a template, trimmed (`{{ env "X" }}` gives `env "X"`).
pub(crate) fn template_expressions(data: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = data;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").unwrap_or_else(|| panic!("unterminated {{{{ in template: {rest}"));
        found.push(after[..end].trim().trim_start_matches('-').trim_end_matches('-').trim().to_owned());
        rest = &after[end + 2..];
    }
    found
}

/// Renders a Nomad template by replacing each `{{ ... }}` with its value from `table`. An
/// expression missing from the table fails the test: a new one must be added here on purpose.
pub(crate) fn render(data: &str, table: &[(&str, String)]) -> String {
    let mut out = String::new();
    let mut rest = data;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("terminated {{");
        let expr = after[..end].trim();
        let value = table.iter().find(|(k, _)| *k == expr).map(|(_, v)| v.clone()).unwrap_or_else(|| {
            panic!("template expression `{{{{ {expr} }}}}` is not in the test's substitution table")
        });
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Undoes HCL quoted-string escapes (`\"`, `\\`, `\n`) in a raw template string.
pub(crate) fn unescape(raw: &str) -> String {
    raw.replace("\\\"", "\"").replace("\\n", "\n").replace("\\\\", "\\")
}
