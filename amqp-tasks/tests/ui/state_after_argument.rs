use amqp_tasks::{State, task};

pub struct Db;

#[task]
pub async fn count(customer: String, db: State<Db>) -> usize {
    let _ = (customer, db);
    0
}

fn main() {}
