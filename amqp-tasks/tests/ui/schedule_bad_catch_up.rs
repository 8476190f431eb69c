use amqp_tasks::task;

#[task(every = "1m", catch_up = "all")]
pub async fn sweep() {}

fn main() {}
