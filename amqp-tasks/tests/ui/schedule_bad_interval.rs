use amqp_tasks::task;

#[task(every = "thirty seconds")]
pub async fn refresh() {}

fn main() {}
