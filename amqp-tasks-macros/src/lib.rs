//! The `#[task]` attribute of [amqp-tasks](https://docs.rs/amqp-tasks).
//!
//! Use it through `amqp_tasks::task`: the runtime crate re-exports it and documents everything it
//! generates. This crate only holds the entry point; the work is split into
//! `parse` → `check` → `expand`, each on `proc_macro2` tokens so it can be unit-tested.

mod check;
mod expand;
mod parse;

use proc_macro::TokenStream;

/// Turns an `async fn` into a task. See `amqp_tasks::task` for the documentation.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(attr.into(), item.into()).into()
}
