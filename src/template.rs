//! `input.text_template`: builds the scored text of a candidate from its fields (Cohere's
//! `rank_fields`), e.g. `"{title}\n{text}"`.
//!
//! A leaf module (serde only): the config validates templates with it at load and the decoder,
//! which the fuzz target compiles on its own, renders them.

use serde::{Deserialize, Serialize};

/// What a template does when a candidate lacks a field it names (or the field is `null`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingField {
    /// The placeholder becomes an empty string.
    #[default]
    Empty,
    /// The event is dead-lettered with `missing_template_field`.
    DeadLetter,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(String),
}

/// A parsed template: literal text and `{field}` placeholders; `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Candidate fields that are not strings, so they cannot be placed into a text.
pub const NOT_TEXT: [&str; 2] = ["retriever_score", "metadata"];

impl Template {
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => {
                    return Err(format!(
                        "has an unmatched `}}` at byte {at} (write `}}}}` for a literal brace)"
                    ))
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some((_, '}')) => break,
                            Some((_, c)) => name.push(c),
                            None => {
                                return Err(format!(
                                    "has an unclosed `{{` at byte {at} (write `{{{{` for a literal brace)"
                                ))
                            }
                        }
                    }
                    let valid = name
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(format!(
                            "has an invalid placeholder `{{{name}}}`: a field name is letters, digits and `_`, not starting with a digit"
                        ));
                    }
                    if NOT_TEXT.contains(&name.as_str()) {
                        return Err(format!(
                            "names `{name}`, which is not a text field of a candidate"
                        ));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(name));
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            // Every candidate would get the same text, so the scores would say nothing.
            return Err("names no field; e.g. \"{title}\\n{text}\"".into());
        }
        Ok(Self {
            source: source.to_string(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the template places `name`.
    pub fn names(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Field(f) if f == name))
    }

    /// The text for one candidate; `Err(field)` for the first missing field under
    /// [`MissingField::DeadLetter`].
    pub fn render<'v>(
        &self,
        field: impl Fn(&str) -> Option<&'v str>,
        missing: MissingField,
    ) -> Result<String, &str> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Field(name) => match (field(name), missing) {
                    (Some(v), _) => out.push_str(v),
                    (None, MissingField::Empty) => {}
                    (None, MissingField::DeadLetter) => return Err(name),
                },
            }
        }
        Ok(out)
    }
}

// In the configuration a template is its source string, checked when the configuration loads.
impl Serialize for Template {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(|e| serde::de::Error::custom(format!("the template {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn renders_fields_literals_and_escaped_braces() {
        let t = Template::parse("{title}\n{text} {{x}} ü").unwrap();
        assert!(t.names("title") && t.names("text") && !t.names("x"));
        let f = [("title", "T"), ("text", "body")];
        assert_eq!(
            t.render(fields(&f), MissingField::Empty).unwrap(),
            "T\nbody {x} ü"
        );
        let only_text = [("text", "body")];
        assert_eq!(
            t.render(fields(&only_text), MissingField::Empty).unwrap(),
            "\nbody {x} ü"
        );
        assert_eq!(
            t.render(fields(&only_text), MissingField::DeadLetter),
            Err("title")
        );
    }

    #[test]
    fn rejects_what_it_cannot_mean() {
        for bad in [
            "",
            "no fields",
            "{{title}}",
            "{title",
            "title}",
            "{}",
            "{1x}",
            "{a-b}",
            "{a b}",
            "{metadata}",
            "{retriever_score}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(Template::parse("{_x1}").is_ok());
    }
}
