use amqp_tasks::{State, task};
use std::cell::RefCell;

pub struct Cache(RefCell<Vec<u8>>);

#[task]
pub async fn cached(cache: State<Cache>, key: String) -> usize {
    let _ = (cache, key);
    0
}

fn main() {}
