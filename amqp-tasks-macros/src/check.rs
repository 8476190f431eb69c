//! Checking: turns what was parsed into a [`Task`] model, or into spanned errors that point at the
//! offending tokens (all of them at once, not only the first).

use crate::parse::{Setting, TaskArgs, TaskFn, combine};
use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{FnArg, GenericArgument, Ident, Lit, Pat, PathArguments, ReturnType, Type};

/// A task, validated and ready to expand.
pub struct Task {
    pub item: TaskFn,
    pub name: String,
    pub queue: String,
    pub timeout_ms: Option<u64>,
    pub retries: u32,
    pub retry_on_panic: bool,
    /// `store_result = false`: its states and results are not written to a result store.
    pub store_result: bool,
    pub backoff_ms: Option<u64>,
    pub json: bool,
    /// The `Context` parameter, when the function takes one first.
    pub context: Option<Ident>,
    /// The `State<T>` parameters, after the `Context` and before the arguments.
    pub states: Vec<StateParam>,
    pub params: Vec<Param>,
    pub output: Output,
    /// `every` / `cron` (with `catch_up`): a periodic task.
    pub schedule: Option<Schedule>,
}

/// When a periodic task ticks, and what a scheduler does with the ticks it missed.
pub struct Schedule {
    pub kind: ScheduleKind,
    /// `catch_up = "none"`: missed ticks are not fired (default `"one"`: the latest one is).
    pub catch_up_none: bool,
}

pub enum ScheduleKind {
    /// `every = d`, in milliseconds.
    EveryMs(u64),
    /// `cron = "..."`, as written (checked for its shape; the runtime parses it with croner).
    Cron(String),
}

pub struct Param {
    pub ident: Ident,
    pub ty: Type,
}

/// A `State<T>` parameter: its name, and `T`.
pub struct StateParam {
    pub ident: Ident,
    pub inner: Type,
}

pub struct Output {
    /// The written return type (`()` when there is none).
    pub ty: Type,
    /// `Some((T, E))` when the return type is written `Result<T, E>`.
    pub fallible: Option<(Type, Type)>,
}

pub fn check(args: TaskArgs, item: TaskFn) -> syn::Result<Task> {
    let mut errors = None;
    let sig = &item.sig;

    if sig.asyncness.is_none() {
        combine(
            &mut errors,
            syn::Error::new(
                sig.fn_token.span(),
                "a #[task] function must be `async`: write `async fn`",
            ),
        );
    }
    if let Some(constness) = &sig.constness {
        combine(
            &mut errors,
            syn::Error::new(constness.span(), "a #[task] function cannot be `const`"),
        );
    }
    if let syn::Safety::Unsafe(token) = &sig.safety {
        combine(
            &mut errors,
            syn::Error::new(token.span(), "a #[task] function cannot be `unsafe`"),
        );
    }
    if let Some(abi) = &sig.abi {
        combine(
            &mut errors,
            syn::Error::new(abi.span(), "a #[task] function cannot have an `extern` ABI"),
        );
    }
    if !sig.generics.params.is_empty() {
        combine(
            &mut errors,
            syn::Error::new(
                sig.generics.params.span(),
                "a #[task] function cannot be generic: a worker must know the concrete argument \
                 types to decode a message",
            ),
        );
    }
    if let Some(where_clause) = &sig.generics.where_clause {
        combine(
            &mut errors,
            syn::Error::new(
                where_clause.span(),
                "a #[task] function cannot have a `where` clause",
            ),
        );
    }
    if let Some(variadic) = &sig.variadic {
        combine(
            &mut errors,
            syn::Error::new(variadic.span(), "a #[task] function cannot be variadic"),
        );
    }

    let mut context = None;
    let mut states = Vec::new();
    let mut params: Vec<Param> = Vec::new();
    let mut contexts = 0;
    for (position, input) in sig.inputs.iter().enumerate() {
        let typed = match input {
            FnArg::Receiver(receiver) => {
                combine(
                    &mut errors,
                    syn::Error::new(
                        receiver.self_token.span(),
                        "a #[task] function cannot take `self`: tasks are free functions; pass the \
                         data it needs as arguments",
                    ),
                );
                continue;
            }
            FnArg::Typed(typed) => typed,
        };
        let ident = match &*typed.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => pat.ident.clone(),
            other => {
                combine(
                    &mut errors,
                    syn::Error::new(
                        other.span(),
                        "a #[task] argument must be a plain name (`name: Type`), because it is \
                         also the argument's key on the wire; destructure it inside the body",
                    ),
                );
                continue;
            }
        };
        if is_context(&typed.ty) {
            contexts += 1;
            if contexts > 1 {
                combine(
                    &mut errors,
                    syn::Error::new(
                        typed.ty.span(),
                        "a task takes at most one `Context`: remove this one",
                    ),
                );
            } else if position != 0 {
                combine(
                    &mut errors,
                    syn::Error::new(
                        typed.ty.span(),
                        "`Context` must be the first parameter of a task",
                    ),
                );
            } else if item.body.is_none() {
                combine(
                    &mut errors,
                    syn::Error::new(
                        typed.ty.span(),
                        "declare a task served elsewhere without its `Context` parameter: the \
                         caller does not send it",
                    ),
                );
            } else {
                context = Some(ident);
            }
            continue;
        }
        if let Some(inner) = state_type(&typed.ty) {
            if item.body.is_none() {
                combine(
                    &mut errors,
                    syn::Error::new(
                        typed.ty.span(),
                        "declare a task served elsewhere without its `State` parameters: the \
                         caller does not send them",
                    ),
                );
            } else if !params.is_empty() {
                combine(
                    &mut errors,
                    syn::Error::new(
                        typed.ty.span(),
                        "`State` parameters come before the task's arguments (after the \
                         `Context`, if any): move this one up",
                    ),
                );
            } else {
                states.push(StateParam { ident, inner });
            }
            continue;
        }
        if let Some(error) = unsupported_type(&typed.ty, "argument") {
            combine(&mut errors, error);
            continue;
        }
        params.push(Param {
            ident,
            ty: (*typed.ty).clone(),
        });
    }

    let output = match &sig.output {
        ReturnType::Default => Output {
            ty: syn::parse_quote!(()),
            fallible: None,
        },
        ReturnType::Type(_, ty) => {
            if let Some(error) = unsupported_type(ty, "return") {
                combine(&mut errors, error);
            }
            Output {
                ty: (**ty).clone(),
                fallible: result_parts(ty),
            }
        }
    };

    let fn_name = sig.ident.to_string().trim_start_matches("r#").to_owned();
    let name = match args.name {
        Some(Setting { value, span }) => {
            if let Some(error) = invalid_name(&value, span, "name") {
                combine(&mut errors, error);
            }
            value
        }
        None => fn_name,
    };
    let queue = match args.queue {
        Some(Setting { value, span }) => {
            if let Some(error) = invalid_name(&value, span, "queue") {
                combine(&mut errors, error);
            }
            value
        }
        None => name.clone(),
    };
    let timeout_ms = take(
        &mut errors,
        args.timeout.map(|s| duration_ms(&s, "timeout")).transpose(),
    );
    let backoff_ms = take(
        &mut errors,
        args.backoff.map(|s| duration_ms(&s, "backoff")).transpose(),
    );
    let retries = take(&mut errors, args.retries.map(|s| retries(&s)).transpose()).unwrap_or(0);
    let retry_on_panic = match args.retry_on_panic {
        None => false,
        Some(Setting {
            value: Lit::Bool(flag),
            ..
        }) => flag.value,
        Some(Setting { span, .. }) => {
            combine(
                &mut errors,
                syn::Error::new(span, "`retry_on_panic` takes `true` or `false`"),
            );
            false
        }
    };
    let store_result = match args.store_result {
        None => true,
        Some(Setting {
            value: Lit::Bool(flag),
            ..
        }) => flag.value,
        Some(Setting { span, .. }) => {
            combine(
                &mut errors,
                syn::Error::new(span, "`store_result` takes `true` or `false`"),
            );
            true
        }
    };
    let json = match args.codec {
        None => false,
        Some(Setting { value, .. }) if value == "bincode" => false,
        Some(Setting { value, .. }) if value == "json" => true,
        Some(Setting { value, span }) => {
            combine(
                &mut errors,
                syn::Error::new(
                    span,
                    format!("unknown codec `{value}`; expected \"bincode\" or \"json\""),
                ),
            );
            false
        }
    };

    let keys = ScheduleKeys {
        every: args.every,
        cron: args.cron,
        catch_up: args.catch_up,
    };
    let schedule = schedule(&mut errors, keys, &params, item.body.is_some());

    if let Some(errors) = errors {
        return Err(errors);
    }
    Ok(Task {
        item,
        name,
        queue,
        timeout_ms,
        retries,
        retry_on_panic,
        store_result,
        backoff_ms,
        json,
        context,
        states,
        params,
        output,
        schedule,
    })
}

/// The schedule's keys as written.
struct ScheduleKeys {
    every: Option<Setting<Lit>>,
    cron: Option<Setting<String>>,
    catch_up: Option<Setting<String>>,
}

/// The `every` / `cron` / `catch_up` keys: a schedule, or errors (both kinds given, a bad
/// interval or cron expression, an unknown catch-up, arguments a tick could not carry).
fn schedule(
    errors: &mut Option<syn::Error>,
    ScheduleKeys {
        every,
        cron,
        catch_up,
    }: ScheduleKeys,
    params: &[Param],
    has_body: bool,
) -> Option<Schedule> {
    let catch_up_none = match &catch_up {
        None => false,
        Some(Setting { value, .. }) if value == "one" => false,
        Some(Setting { value, .. }) if value == "none" => true,
        Some(Setting { value, span }) => {
            combine(
                errors,
                syn::Error::new(
                    *span,
                    format!(
                        "unknown catch_up `{value}`; expected \"one\" (fire the latest missed tick \
                         once, the default) or \"none\" (fire no missed tick)"
                    ),
                ),
            );
            false
        }
    };
    let kind = match (every, cron) {
        (None, None) => {
            if let Some(Setting { span, .. }) = catch_up {
                combine(
                    errors,
                    syn::Error::new(
                        span,
                        "`catch_up` applies to a periodic task: add `every = \"...\"` or \
                         `cron = \"...\"`",
                    ),
                );
            }
            return None;
        }
        (Some(_), Some(Setting { span, .. })) => {
            combine(
                errors,
                syn::Error::new(
                    span,
                    "a periodic task takes `every` or `cron`, not both: remove one",
                ),
            );
            return None;
        }
        (Some(every), None) => {
            let span = every.span;
            match duration_ms(&every, "every") {
                Ok(ms) => Some((ScheduleKind::EveryMs(ms), span)),
                Err(error) => {
                    combine(errors, error);
                    None
                }
            }
        }
        (None, Some(Setting { value, span })) => match cron_problem(&value) {
            None => Some((ScheduleKind::Cron(value), span)),
            Some(problem) => {
                combine(errors, syn::Error::new(span, problem));
                None
            }
        },
    };
    let (kind, span) = kind?;
    if !has_body {
        combine(
            errors,
            syn::Error::new(
                span,
                "a periodic task is scheduled where it is defined: a declaration of a task served \
                 elsewhere cannot take `every` or `cron`",
            ),
        );
        return None;
    }
    for param in params {
        combine(
            errors,
            syn::Error::new(
                param.ty.span(),
                format!(
                    "a periodic task takes no arguments besides `Context` and `State`s (its ticks \
                     carry none): remove `{}`",
                    param.ident
                ),
            ),
        );
    }
    Some(Schedule {
        kind,
        catch_up_none,
    })
}

/// What is wrong with a cron expression, as far as its shape tells: six fields (seconds first),
/// each made of what croner accepts. The rest (ranges, names) is checked by croner when the
/// worker starts.
fn cron_problem(expression: &str) -> Option<String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    if fields.len() != 6 {
        return Some(format!(
            "`cron` takes six fields, `sec min hour day-of-month month day-of-week` (UTC; the \
             seconds field is required), such as \"0 */5 * * * *\"; this one has {}",
            fields.len()
        ));
    }
    let limits = [
        ("seconds", 59),
        ("minutes", 59),
        ("hours", 23),
        ("day-of-month", 31),
        ("month", 12),
        ("day-of-week", 7),
    ];
    for (field, (name, max)) in fields.iter().zip(limits) {
        if let Some(bad) = field
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "*/,-?#".contains(*c)))
        {
            return Some(format!(
                "`cron`: the {name} field `{field}` cannot contain `{bad}`"
            ));
        }
        let all_digits = field.chars().all(|c| c.is_ascii_digit());
        if all_digits && !field.parse::<u32>().is_ok_and(|n| n <= max) {
            return Some(format!(
                "`cron`: the {name} field `{field}` is out of range (at most {max})"
            ));
        }
    }
    None
}

fn take<T>(errors: &mut Option<syn::Error>, result: syn::Result<Option<T>>) -> Option<T> {
    match result {
        Ok(value) => value,
        Err(error) => {
            combine(errors, error);
            None
        }
    }
}

/// `Context`, `amqp_tasks::Context`, `::amqp_tasks::Context`: matched by its last segment, as the
/// macro cannot resolve imports.
fn is_context(ty: &Type) -> bool {
    match ty {
        Type::Path(path) if path.qself.is_none() => path
            .path
            .segments
            .last()
            .is_some_and(|segment| segment.ident == "Context" && segment.arguments.is_empty()),
        _ => false,
    }
}

/// `State<T>` (any path ending in `State` with one type argument, as the macro cannot resolve
/// imports): `T`. A `State` of another shape is an ordinary argument type (the user's own).
fn state_type(ty: &Type) -> Option<Type> {
    let Type::Path(path) = ty else { return None };
    if path.qself.is_some() {
        return None;
    }
    let last = path.path.segments.last()?;
    if last.ident != "State" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(inner)] => Some(inner.clone()),
        _ => None,
    }
}

/// Types that cannot travel in a message: borrowed, `impl Trait`, or with lifetimes.
fn unsupported_type(ty: &Type, role: &str) -> Option<syn::Error> {
    match ty {
        Type::Reference(reference) => Some(syn::Error::new(
            reference.and_token.span(),
            format!(
                "a task {role} type must be owned (it travels in a message): use `String`, `Vec<T>`, ... instead of a reference"
            ),
        )),
        Type::ImplTrait(impl_trait) => Some(syn::Error::new(
            impl_trait.impl_token.span(),
            format!(
                "a task {role} type cannot be `impl Trait`: the worker needs a concrete type to decode"
            ),
        )),
        Type::Path(path) => {
            path.path
                .segments
                .iter()
                .find_map(|segment| match &segment.arguments {
                    PathArguments::AngleBracketed(args) => {
                        args.args.iter().find_map(|arg| match arg {
                            GenericArgument::Lifetime(lifetime) => Some(syn::Error::new(
                                lifetime.span(),
                                format!(
                                    "a task {role} type must be `'static` (it travels in a message)"
                                ),
                            )),
                            GenericArgument::Type(inner) => unsupported_type(inner, role),
                            _ => None,
                        })
                    }
                    _ => None,
                })
        }
        Type::Tuple(tuple) => tuple
            .elems
            .iter()
            .find_map(|elem| unsupported_type(elem, role)),
        Type::Array(array) => unsupported_type(&array.elem, role),
        Type::Paren(paren) => unsupported_type(&paren.elem, role),
        _ => None,
    }
}

/// `Result<T, E>` as written (any path ending in `Result` with two type arguments).
fn result_parts(ty: &Type) -> Option<(Type, Type)> {
    let Type::Path(path) = ty else { return None };
    let last = path.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    let mut types = args.args.iter().filter_map(|arg| match arg {
        GenericArgument::Type(ty) => Some(ty.clone()),
        _ => None,
    });
    let (ok, err) = (types.next()?, types.next()?);
    types.next().is_none().then_some((ok, err))
}

fn invalid_name(value: &str, span: Span, key: &str) -> Option<syn::Error> {
    let problem = if value.is_empty() {
        "cannot be empty"
    } else if value.len() > 200 {
        "must be at most 200 bytes (queue names are limited to 255)"
    } else if value.starts_with("amq.") {
        "cannot start with `amq.`, which RabbitMQ reserves"
    } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "cannot contain whitespace"
    } else {
        return None;
    };
    Some(syn::Error::new(span, format!("the task {key} {problem}")))
}

fn retries(setting: &Setting<Lit>) -> syn::Result<u32> {
    match &setting.value {
        Lit::Int(int) => int.base10_parse::<u32>(),
        _ => Err(syn::Error::new(
            setting.span,
            "`retries` takes a whole number, such as `retries = 3`",
        )),
    }
}

/// `30` (seconds), `"30s"`, `"500ms"`, `"2m"`, `"1h"`.
fn duration_ms(setting: &Setting<Lit>, key: &str) -> syn::Result<u64> {
    let invalid = || {
        syn::Error::new(
            setting.span,
            format!(
                "`{key}` takes seconds (`{key} = 30`) or a duration with a unit: \"500ms\", \"30s\", \"2m\", \"1h 30m\""
            ),
        )
    };
    let ms = match &setting.value {
        Lit::Int(int) => int
            .base10_parse::<u64>()
            .map_err(|_| invalid())?
            .checked_mul(1000),
        Lit::Str(text) => parse_duration_ms(&text.value()),
        _ => None,
    }
    .ok_or_else(invalid)?;
    if ms == 0 {
        return Err(syn::Error::new(
            setting.span,
            format!("`{key}` must be longer than zero"),
        ));
    }
    Ok(ms)
}

/// The runtime's duration syntax (its command-line options read the same): humantime's
/// (`500ms`, `30s`, `2m`, `1h 30m`), or a bare number of seconds.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        std::time::Duration::from_secs(text.parse().ok()?)
    } else {
        humantime::parse_duration(text).ok()?
    };
    u64::try_from(duration.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quote::quote;

    fn checked(
        attr: proc_macro2::TokenStream,
        item: proc_macro2::TokenStream,
    ) -> syn::Result<Task> {
        check(TaskArgs::parse(attr).unwrap(), syn::parse2(item).unwrap())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("2m"), Some(120_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("1h 30m"), Some(5_400_000));
        assert_eq!(parse_duration_ms("45"), Some(45_000));
        assert_eq!(parse_duration_ms("1 fortnight"), None);
        assert_eq!(parse_duration_ms("s"), None);
    }

    #[test]
    fn defaults_name_and_queue_to_the_function() {
        let task = checked(
            quote!(),
            quote!(
                pub async fn add(a: i64, b: i64) -> i64 {
                    a + b
                }
            ),
        )
        .unwrap();
        assert_eq!((task.name.as_str(), task.queue.as_str()), ("add", "add"));
        assert_eq!(task.params.len(), 2);
        assert!(task.output.fallible.is_none());
    }

    #[test]
    fn recognises_fallible_tasks_and_context() {
        let task = checked(
            quote!(name = "stats.avg", timeout = 5),
            quote!(
                async fn avg(ctx: amqp_tasks::Context, xs: Vec<i64>) -> Result<i64, StatsError> {
                    todo!()
                }
            ),
        )
        .unwrap();
        assert_eq!(task.context.unwrap(), "ctx");
        assert_eq!(task.params.len(), 1);
        assert!(task.output.fallible.is_some());
        assert_eq!(task.timeout_ms, Some(5_000));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let error = match checked(
            quote!(),
            quote!(
                fn bad<T>(&self, (a, b): (T, T)) {}
            ),
        ) {
            Err(error) => error,
            Ok(_) => panic!("accepted a bad task"),
        };
        let messages: Vec<String> = error.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(messages.len(), 4, "{messages:#?}");
        assert!(messages[0].contains("must be `async`"));
        assert!(messages[1].contains("cannot be generic"));
        assert!(messages[2].contains("cannot take `self`"));
        assert!(messages[3].contains("plain name"));
    }

    #[test]
    fn context_only_first_and_not_in_declarations() {
        let late = checked(
            quote!(),
            quote!(
                async fn f(a: i64, ctx: Context) {}
            ),
        )
        .err()
        .unwrap();
        assert!(late.to_string().contains("first parameter"));
        let declared = checked(
            quote!(),
            quote!(
                async fn f(ctx: Context, a: i64);
            ),
        )
        .err()
        .unwrap();
        assert!(declared.to_string().contains("without its `Context`"));
    }

    #[test]
    fn states_come_between_context_and_arguments() {
        let task = checked(
            quote!(),
            quote!(
                async fn f(ctx: Context, db: State<Db>, http: amqp_tasks::State<Http>, x: i64) {}
            ),
        )
        .unwrap();
        assert_eq!(task.context.unwrap(), "ctx");
        let states: Vec<String> = task.states.iter().map(|s| s.ident.to_string()).collect();
        assert_eq!(states, ["db", "http"]);
        assert_eq!(task.params.len(), 1);
        assert_eq!(task.params[0].ident, "x");

        // The user's own `State` type (no type argument) is an ordinary argument.
        let task = checked(
            quote!(),
            quote!(
                async fn g(state: State, x: i64) {}
            ),
        )
        .unwrap();
        assert!(task.states.is_empty());
        assert_eq!(task.params.len(), 2);
    }

    #[test]
    fn states_misplaced_declared_or_twice_a_context() {
        let late = checked(
            quote!(),
            quote!(
                async fn f(x: i64, db: State<Db>) {}
            ),
        )
        .err()
        .unwrap();
        assert!(
            late.to_string().contains("before the task's arguments"),
            "{late}"
        );
        let declared = checked(
            quote!(),
            quote!(
                async fn f(db: State<Db>, x: i64);
            ),
        )
        .err()
        .unwrap();
        assert!(
            declared.to_string().contains("without its `State`"),
            "{declared}"
        );
        let twice = checked(
            quote!(),
            quote!(
                async fn f(a: Context, b: Context) {}
            ),
        )
        .err()
        .unwrap();
        assert!(
            twice.to_string().contains("at most one `Context`"),
            "{twice}"
        );
    }

    #[test]
    fn schedules() {
        let task = checked(
            quote!(every = "30s"),
            quote!(
                async fn refresh(db: State<Db>) {}
            ),
        )
        .unwrap();
        let schedule = task.schedule.unwrap();
        assert!(matches!(schedule.kind, ScheduleKind::EveryMs(30_000)));
        assert!(!schedule.catch_up_none);
        let task = checked(
            quote!(cron = "0 */5 * * * *", catch_up = "none"),
            quote!(
                async fn sweep(ctx: Context) {}
            ),
        )
        .unwrap();
        let schedule = task.schedule.unwrap();
        assert!(matches!(&schedule.kind, ScheduleKind::Cron(c) if c == "0 */5 * * * *"));
        assert!(schedule.catch_up_none);
        assert!(
            checked(
                quote!(),
                quote!(
                    async fn plain() {}
                )
            )
            .unwrap()
            .schedule
            .is_none()
        );
    }

    #[test]
    fn bad_schedules_are_errors() {
        let cases = [
            (
                quote!(every = "30s"),
                quote!(
                    async fn f(x: i64) {}
                ),
                "no arguments besides",
            ),
            (
                quote!(every = "1s", cron = "* * * * * *"),
                quote!(
                    async fn f() {}
                ),
                "not both",
            ),
            (
                quote!(every = "soon"),
                quote!(
                    async fn f() {}
                ),
                "`every` takes seconds",
            ),
            (
                quote!(every = 0),
                quote!(
                    async fn f() {}
                ),
                "longer than zero",
            ),
            (
                quote!(cron = "*/5 * * * *"),
                quote!(
                    async fn f() {}
                ),
                "this one has 5",
            ),
            (
                quote!(cron = "0 0 25 * * *"),
                quote!(
                    async fn f() {}
                ),
                "hours field `25`",
            ),
            (
                quote!(cron = "0 0 1 * * $"),
                quote!(
                    async fn f() {}
                ),
                "cannot contain `$`",
            ),
            (
                quote!(every = "1s", catch_up = "all"),
                quote!(
                    async fn f() {}
                ),
                "unknown catch_up",
            ),
            (
                quote!(catch_up = "one"),
                quote!(
                    async fn f() {}
                ),
                "applies to a periodic task",
            ),
            (
                quote!(every = "1s"),
                quote!(
                    async fn f();
                ),
                "a declaration",
            ),
        ];
        for (attr, item, expected) in cases {
            let error = checked(attr, item).err().expect(expected).to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    #[test]
    fn references_are_rejected() {
        let error = checked(
            quote!(),
            quote!(
                async fn f(a: &str) {}
            ),
        )
        .err()
        .unwrap();
        assert!(error.to_string().contains("must be owned"));
    }
}
