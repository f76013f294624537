from rap.cli import main

main()
