from fedbench.cli import main

main()
