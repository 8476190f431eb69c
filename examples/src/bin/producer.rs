//! Run with: cargo run -p amqp-tasks-examples --bin producer
//!
//! The producer role: sends tasks to the `worker` (and, if it runs, the `relay`) and prints the
//! answers. Reads `AMQP_URL` (default: the local broker) and `AMQP_TASKS_NAMESPACE`.

use amqp_tasks::{CallError, Client};
use amqp_tasks_examples::math::{DivError, add, div, sum};
use amqp_tasks_examples::text::shout;
use std::time::Duration;

// A task served by the relay service, declared here without its implementation.
#[amqp_tasks::task(name = "stats.average")]
pub async fn average(xs: Vec<i64>) -> Result<i64, String>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::from_env().await?;

    let id = add::new(1, 2).delay(&client).await?;
    println!("add(1, 2) sent as task {id}");

    println!("add(1, 2) = {}", add::new(1, 2).call(&client).await?);
    println!(
        "sum([1..=10]) = {}",
        sum::new((1..=10).collect()).call(&client).await?
    );
    println!(
        "shout(\"hello\") = {}",
        shout::new("hello".into()).call(&client).await?
    );

    match div::new(1, 0)
        .timeout(Duration::from_secs(2))
        .call(&client)
        .await
    {
        Err(CallError::Task(DivError::ByZero)) => {
            println!("div(1, 0) failed as it should: division by zero")
        }
        other => println!("div(1, 0) = {other:?}"),
    }

    match average::new(vec![2, 4, 9])
        .timeout(Duration::from_secs(5))
        .call(&client)
        .await
    {
        Ok(mean) => println!("average([2, 4, 9]) = {mean} (through the relay)"),
        Err(CallError::NoRoute { .. }) => println!("average: the relay service has never run"),
        Err(error) => println!("average failed: {error}"),
    }
    Ok(())
}
