use amqp_tasks::task;

pub struct Calculator;

impl Calculator {
    #[task]
    pub async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
}

fn main() {}
