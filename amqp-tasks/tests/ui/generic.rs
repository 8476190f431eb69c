use amqp_tasks::task;

#[task]
pub async fn first<T: Clone>(items: Vec<T>) -> T {
    items[0].clone()
}

fn main() {}
