"""C++ and CUDA sources of fastddpm, shipped as package data and compiled on first use."""
