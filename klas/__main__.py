from klas.cli import main

main()
