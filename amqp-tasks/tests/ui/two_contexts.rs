use amqp_tasks::{Context, task};

#[task]
pub async fn twice(ctx: Context, again: Context, x: i64) -> i64 {
    let _ = (ctx, again);
    x
}

fn main() {}
