use amqp_tasks::task;

#[task(name = "math.add", retry = 3)]
pub async fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {}
