//! (being written)

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<(), kvbits::Error> {
    Ok(())
}
