from imgvec.cli.commands import main

main()
