/** What the views ask the application to do (the plugin implements it with commands). */
export interface IActions {
  refresh(): void;
  stop(name: string): void;
  remove(name: string): void;
  logs(name: string): void;
  fork(name: string): void;
  compare(names: string[]): void;
  submit(name: string): void;
  pull(ref: string): void;
  showBoard(dataset: string): void;
}
