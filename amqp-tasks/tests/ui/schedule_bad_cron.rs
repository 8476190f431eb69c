use amqp_tasks::task;

// Five fields: the seconds field is required.
#[task(cron = "*/5 * * * *")]
pub async fn sweep() {}

fn main() {}
