from mlx_gemma_tune.cli import main

if __name__ == "__main__":
    main()
