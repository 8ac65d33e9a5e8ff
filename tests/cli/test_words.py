"""The library's keyword arguments said as the command line's options, in errors and in what a command prints."""

from fedleak.cli.words import as_options


def test_keyword_arguments_read_as_options():
    assert as_options("pass num_examples") == "pass --num-examples"
    assert as_options("num_examples=4 given") == "--num-examples 4 given"
    assert as_options("(pass label_smoothing)") == "(pass --label-smoothing)"
    assert as_options("label_smoothing=0.1") == "--label-smoothing 0.1"
    assert as_options("learning_rate must be positive") == "--learning-rate must be positive"
    assert as_options("but local_steps=3; pass local_steps only") == "but --local-steps 3; pass --local-steps only"
    assert as_options("(pass class_weights)") == "(pass --class-weights)"
    assert as_options("num_examples must lie in [1, 9]") == "num_examples must lie in [1, 9]"  # as the CLI has said
    assert as_options("input_shape=(1, 28, 28)") == "--input-shape 1,28,28"
    assert as_options("kind='change'") == "--update-kind change"
    assert as_options("the number of examples") == "the number of examples"
    assert as_options("a focal loss: pass focal_gamma)") == "a focal loss: pass --focal-gamma)"
    assert as_options("focal_gamma=2 given") == "--focal-gamma 2 given"
    assert as_options("give it data_range=(-1, 1)") == "give it --data-range -1,1"
    assert as_options("does not read the range (data_range);") == "does not read the range (--data-range);"
    assert as_options("a focal loss needs focal_gamma)") == "a focal loss needs --focal-gamma)"
