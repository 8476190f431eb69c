use amqp_tasks::{Context, task};

#[task]
pub async fn relay(x: i64, ctx: Context) -> i64 {
    let _ = ctx;
    x
}

fn main() {}
