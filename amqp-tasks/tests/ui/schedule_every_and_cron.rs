use amqp_tasks::task;

#[task(every = "30s", cron = "0 */5 * * * *")]
pub async fn sweep() {}

fn main() {}
