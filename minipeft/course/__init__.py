"""minipeft.course: what the lessons use beside the library and the lab: the exercises' checks, the exercise
generator, figures, the parameter explorer widget and the notebook runner."""
