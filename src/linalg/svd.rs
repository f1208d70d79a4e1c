use nalgebra::DMatrix;
