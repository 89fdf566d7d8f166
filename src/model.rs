pub struct ModelShape;
