//! Generated code names only `::amqp_tasks`, `::core` and `::std`: it compiles in a module
//! without the prelude, next to user items that shadow prelude names.

mod hygienic {
    #![no_implicit_prelude]

    // Shadow what generated code must not rely on.
    #[allow(dead_code)]
    pub struct Result;
    #[allow(dead_code)]
    pub struct Option;
    #[allow(dead_code)]
    pub struct String;
    #[allow(dead_code)]
    pub struct Vec;
    #[allow(dead_code)]
    pub struct Box;
    #[allow(dead_code)]
    pub trait Send {}
    #[allow(dead_code)]
    pub struct Duration;
    #[allow(dead_code)]
    pub mod inventory {}
    #[allow(dead_code)]
    pub mod serde {}

    #[::amqp_tasks::task]
    pub async fn add(a: i64, b: i64) -> i64 {
        a + b
    }

    #[::amqp_tasks::task(name = "hygiene.div", timeout = "2s", codec = "json")]
    pub async fn div(a: i64, b: i64) -> ::core::result::Result<i64, ::std::string::String> {
        if b == 0 {
            return ::core::result::Result::Err(::std::borrow::ToOwned::to_owned("by zero"));
        }
        ::core::result::Result::Ok(a / b)
    }

    #[::amqp_tasks::task]
    pub async fn relay(ctx: ::amqp_tasks::Context, x: ::std::vec::Vec<u8>) -> usize {
        let _ = ctx.task_id();
        x.len()
    }

    #[::amqp_tasks::task(cron = "0 0 * * * 0", catch_up = "none")]
    pub async fn hourly_on_sundays(ctx: ::amqp_tasks::Context) {
        let _ = ctx.task_id();
    }

    #[::amqp_tasks::task(name = "elsewhere.charge")]
    pub async fn charge(cents: u64) -> ::core::option::Option<u64>;
}

use amqp_tasks::Task;

#[test]
fn tasks_expand_without_the_prelude() {
    assert_eq!(<hygienic::add as Task>::NAME, "add");
    assert_eq!(<hygienic::div as Task>::NAME, "hygiene.div");
    assert_eq!(<hygienic::div as Task>::CODEC, amqp_tasks::Codec::Json);
    assert_eq!(
        <hygienic::div as Task>::TIMEOUT,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(<hygienic::charge as Task>::QUEUE, "elsewhere.charge");
    let params: Vec<&str> = <hygienic::relay as Task>::PARAMS
        .iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(params, ["x"]);
    let _call = hygienic::add::new(1, 2);
}

#[test]
fn the_function_stays_an_ordinary_function() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(runtime.block_on(hygienic::add(1, 2)), 3);
    assert_eq!(
        runtime.block_on(hygienic::div(1, 0)),
        Err("by zero".to_owned())
    );
}

#[test]
fn only_tasks_with_a_body_are_registered() {
    let names: Vec<&str> = amqp_tasks::registry::tasks()
        .iter()
        .map(|t| t.name())
        .collect();
    assert_eq!(names, ["add", "hourly_on_sundays", "hygiene.div", "relay"]);
}

#[test]
fn a_schedule_is_registered_with_its_task() {
    let schedules: Vec<(&str, String)> = amqp_tasks::registry::tasks()
        .iter()
        .filter_map(|t| Some((t.name(), t.schedule()?.to_string())))
        .collect();
    assert_eq!(
        schedules,
        [(
            "hourly_on_sundays",
            "cron \"0 0 * * * 0\" (UTC), catch_up none".to_owned()
        )]
    );
}
