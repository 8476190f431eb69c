//! Parsing: the attribute's `key = value` list and the annotated function, without judging them.

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream, Parser};
use syn::{Attribute, Block, Expr, ExprLit, Lit, LitStr, Signature, Token, Visibility};

/// The keys `#[task(...)]` accepts, in the order the documentation lists them.
pub const KEYS: &[&str] = &[
    "name",
    "queue",
    "timeout",
    "retries",
    "backoff",
    "retry_on_panic",
    "codec",
    "every",
    "cron",
    "catch_up",
    "store_result",
];

/// A value given to a key, with the span of the value for error messages.
pub struct Setting<T> {
    pub value: T,
    pub span: Span,
}

/// The attribute's arguments as written; `check` validates them.
#[derive(Default)]
pub struct TaskArgs {
    pub name: Option<Setting<String>>,
    pub queue: Option<Setting<String>>,
    pub timeout: Option<Setting<Lit>>,
    pub retries: Option<Setting<Lit>>,
    pub retry_on_panic: Option<Setting<Lit>>,
    pub backoff: Option<Setting<Lit>>,
    pub codec: Option<Setting<String>>,
    /// `every = "30s"`: a periodic task, ticking at Unix times divisible by the interval.
    pub every: Option<Setting<Lit>>,
    /// `cron = "sec min hour dom month dow"`: a periodic task on a cron schedule (UTC).
    pub cron: Option<Setting<String>>,
    /// `catch_up = "one" | "none"`: what a scheduler does with the ticks it missed.
    pub catch_up: Option<Setting<String>>,
    pub store_result: Option<Setting<Lit>>,
}

impl TaskArgs {
    pub fn parse(tokens: TokenStream) -> syn::Result<Self> {
        let mut args = TaskArgs::default();
        let mut errors: Option<syn::Error> = None;
        let parser = syn::meta::parser(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(|ident| ident.to_string())
                .unwrap_or_default();
            let key_span = meta
                .path
                .segments
                .first()
                .map_or_else(Span::call_site, |s| s.ident.span());
            let duplicate = || syn::Error::new(key_span, format!("`{key}` is given twice"));
            let result = match key.as_str() {
                "name" => set(&mut args.name, string(&meta)?, duplicate),
                "queue" => set(&mut args.queue, string(&meta)?, duplicate),
                "codec" => set(&mut args.codec, string(&meta)?, duplicate),
                "timeout" => set(&mut args.timeout, literal(&meta)?, duplicate),
                "retries" => set(&mut args.retries, literal(&meta)?, duplicate),
                "retry_on_panic" => set(&mut args.retry_on_panic, literal(&meta)?, duplicate),
                "backoff" => set(&mut args.backoff, literal(&meta)?, duplicate),
                "every" => set(&mut args.every, literal(&meta)?, duplicate),
                "cron" => set(&mut args.cron, string(&meta)?, duplicate),
                "catch_up" => set(&mut args.catch_up, string(&meta)?, duplicate),
                "store_result" => set(&mut args.store_result, literal(&meta)?, duplicate),
                _ => {
                    // Skip the value so that the keys after it are still read and checked.
                    if meta.input.peek(Token![=]) {
                        let _: Token![=] = meta.input.parse()?;
                        let _: Expr = meta.input.parse()?;
                    }
                    let written = path_text(&meta.path);
                    let hint = suggestion(&written)
                        .map(|valid| format!(" (did you mean `{valid}`?)"))
                        .unwrap_or_default();
                    Err(syn::Error::new(
                        key_span,
                        format!(
                            "unknown #[task] key `{written}`{hint}; the valid keys are: {}",
                            KEYS.join(", ")
                        ),
                    ))
                }
            };
            if let Err(error) = result {
                combine(&mut errors, error);
            }
            Ok(())
        });
        parser.parse2(tokens)?;
        match errors {
            Some(errors) => Err(errors),
            None => Ok(args),
        }
    }
}

fn set<T>(
    slot: &mut Option<T>,
    value: T,
    duplicate: impl FnOnce() -> syn::Error,
) -> syn::Result<()> {
    if slot.is_some() {
        return Err(duplicate());
    }
    *slot = Some(value);
    Ok(())
}

fn string(meta: &syn::meta::ParseNestedMeta) -> syn::Result<Setting<String>> {
    let lit: LitStr = meta.value()?.parse()?;
    Ok(Setting {
        value: lit.value(),
        span: lit.span(),
    })
}

fn literal(meta: &syn::meta::ParseNestedMeta) -> syn::Result<Setting<Lit>> {
    let expr: Expr = meta.value()?.parse()?;
    match expr {
        Expr::Lit(ExprLit { lit, .. }) => Ok(Setting {
            span: lit.span(),
            value: lit,
        }),
        other => Err(syn::Error::new_spanned(
            other,
            "expected a literal, such as `30`, `\"30s\"` or `\"500ms\"`",
        )),
    }
}

/// The valid key `written` was most likely meant to be: the nearest by edit distance, if near.
fn suggestion(written: &str) -> Option<&'static str> {
    // On a tie, a key that starts like what was written.
    let first = written.chars().next();
    KEYS.iter()
        .map(|valid| {
            let distance = distance(valid, written);
            (distance, valid.chars().next() != first, *valid)
        })
        .filter(|(distance, _, valid)| *distance <= 3.min(valid.len() / 2 + 1))
        .min()
        .map(|(_, _, valid)| valid)
}

fn distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            current.push(
                (previous[j] + cost)
                    .min(previous[j + 1] + 1)
                    .min(current[j] + 1),
            );
        }
        previous = current;
    }
    previous[b.len()]
}

fn path_text(path: &syn::Path) -> String {
    path.segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

pub fn combine(slot: &mut Option<syn::Error>, error: syn::Error) {
    match slot {
        Some(existing) => existing.combine(error),
        None => *slot = Some(error),
    }
}

/// The annotated function: `fn` with a body (a task served here) or with `;` (a declaration of a
/// task served elsewhere).
pub struct TaskFn {
    pub attrs: Vec<Attribute>,
    pub vis: Visibility,
    pub sig: Signature,
    pub body: Option<Box<Block>>,
}

impl Parse for TaskFn {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis: Visibility = input.parse()?;
        let sig: Signature = input.parse()?;
        let body = if input.peek(Token![;]) {
            let _: Token![;] = input.parse()?;
            None
        } else {
            Some(Box::new(input.parse()?))
        };
        Ok(TaskFn {
            attrs,
            vis,
            sig,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    #[test]
    fn reads_every_key() {
        let args = TaskArgs::parse(quote!(
            name = "math.div",
            queue = "math",
            timeout = "2s",
            retries = 3,
            backoff = "100ms",
            codec = "json",
            every = "30s",
            catch_up = "none"
        ))
        .unwrap();
        assert!(args.every.is_some() && args.cron.is_none());
        assert_eq!(args.catch_up.unwrap().value, "none");
        assert_eq!(args.name.unwrap().value, "math.div");
        assert_eq!(args.queue.unwrap().value, "math");
        assert_eq!(args.codec.unwrap().value, "json");
        assert!(args.timeout.is_some() && args.retries.is_some() && args.backoff.is_some());
    }

    #[test]
    fn unknown_key_lists_the_valid_ones() {
        let error = TaskArgs::parse(quote!(nmae = "x"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("unknown #[task] key `nmae` (did you mean `name`?)"),
            "{error}"
        );
        assert!(
            error.contains(
                "name, queue, timeout, retries, backoff, retry_on_panic, codec, every, cron, \
                 catch_up, store_result"
            ),
            "{error}"
        );
    }

    #[test]
    fn suggestions_pick_the_nearest_key() {
        assert_eq!(suggestion("retry"), Some("retries"));
        assert_eq!(suggestion("timout"), Some("timeout"));
        assert_eq!(suggestion("codecs"), Some("codec"));
        assert_eq!(suggestion("priority"), None);
        assert_eq!(suggestion("evry"), Some("every"));
        assert_eq!(suggestion("catchup"), Some("catch_up"));
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let error = TaskArgs::parse(quote!(name = "a", name = "b"))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("`name` is given twice"), "{error}");
    }

    #[test]
    fn parses_a_declaration_without_body() {
        let item: TaskFn = syn::parse2(quote!(
            pub async fn charge(order: Order) -> Receipt;
        ))
        .unwrap();
        assert!(item.body.is_none());
        assert_eq!(item.sig.ident, "charge");
    }
}
