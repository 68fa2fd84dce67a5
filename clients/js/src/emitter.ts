/**
 * A minimal typed event emitter. `Events` maps each event name to the tuple
 * of arguments its listeners receive.
 */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export class Emitter<Events extends { [name: string]: any[] }> {
  private _listeners: { [K in keyof Events]?: Array<(...args: Events[K]) => void> } = {};

  /** Adds a listener; returns a function that removes it again. */
  on<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): () => void {
    (this._listeners[event] ||= []).push(listener);
    return () => this.off(event, listener);
  }

  /** Removes a listener added with `on`. */
  off<K extends keyof Events>(event: K, listener: (...args: Events[K]) => void): void {
    const list = this._listeners[event];
    const index = list ? list.indexOf(listener) : -1;
    if (index >= 0) list!.splice(index, 1);
  }

  /**
   * Calls every listener of `event`. A listener that throws does not stop the
   * others or the client: its exception is rethrown from a fresh task, so it
   * reaches the console and `window.onerror` like any uncaught error.
   * @internal
   */
  _emit<K extends keyof Events>(event: K, ...args: Events[K]): void {
    for (const listener of (this._listeners[event] || []).slice()) {
      try {
        listener(...args);
      } catch (error) {
        setTimeout(() => {
          throw error;
        });
      }
    }
  }
}
